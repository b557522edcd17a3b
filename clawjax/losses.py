"""The combined PPO / OPD loss of OpenClaw-RL (SPEC.md §1–§5): pure, jit-able functions on arrays.

Imports jax, numpy and the standard library only, so other JAX projects can
`from clawjax import losses` without flax, grpc, torch or transformers.

Shapes: a packed batch is `[R, L]` (rows × token budget). The value at `[r, t]` is about the token
`tokens[r, t]` predicted from the tokens before it in the same segment; `segment_ids` are 1..n per
row and 0 is padding. Per-token functions also accept any leading shape `[...]`.

Reductions return `(sum, denominator)` pairs so that gradient accumulation over micro-batches can
add sums and denominators and divide once (exact, because a sample lives in one row of one
micro-batch and denominators do not depend on the parameters).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Terms = dict[str, tuple[Array, Array]]

REDUCTIONS = ("sample_mean", "token_mean")
KL_KINDS = ("k1", "k2", "low_var_kl")
LOW_VAR_KL_CLAMP = 10.0
TOPK_TAIL_MAX_LOGSUMEXP = -1e-7


def _floating(x: Array) -> Array:
    """x as a float of at least float32 precision (bfloat16 → float32, float64 kept)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ---------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Coefficients of the combined loss. Frozen and hashable: usable as a static jit argument.

    loss = pg − entropy_coef · entropy + kl_coef · kl + topk_coef · topk_kl, every term a
    per-token quantity reduced with `reduction` over loss-masked tokens.
    `use_tis` multiplies the per-token policy loss by the truncated importance weight
    min(exp(old_logp − rollout_logp), tis_cap) (a constant: no gradient flows through it).
    """

    w_rl: float = 1.0
    w_opd: float = 1.0
    eps_clip: float = 0.2
    eps_clip_high: float = 0.28
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_kind: str = "low_var_kl"
    entropy_coef: float = 0.0
    reduction: str = "sample_mean"
    topk_coef: float = 0.0
    use_tis: bool = False
    tis_cap: float = 2.0

    def __post_init__(self):
        def fail(name, expected):
            raise ValueError(
                f"LossConfig.{name} = {getattr(self, name)!r}, expected {expected}")

        def number(name, ok, expected):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(name, f"a number ({expected})")
            if not math.isfinite(value) or not ok(float(value)):
                fail(name, expected)
            object.__setattr__(self, name, float(value))

        number("w_rl", lambda v: True, "a finite float")
        number("w_opd", lambda v: True, "a finite float")
        number("eps_clip", lambda v: 0.0 <= v < 1.0, "a float in [0, 1)")
        number("eps_clip_high", lambda v: v >= 0.0, "a float ≥ 0")
        if self.dual_clip is not None:
            number("dual_clip", lambda v: v > 1.0, "None or a float > 1")
        number("kl_coef", lambda v: v >= 0.0, "a float ≥ 0")
        number("entropy_coef", lambda v: True, "a finite float")
        number("topk_coef", lambda v: v >= 0.0, "a float ≥ 0")
        number("tis_cap", lambda v: v > 0.0, "a float > 0")
        if self.kl_kind not in KL_KINDS:
            fail("kl_kind", f"one of {KL_KINDS}")
        if self.reduction not in REDUCTIONS:
            fail("reduction", f"one of {REDUCTIONS}")
        if not isinstance(self.use_tis, bool):
            fail("use_tis", "a bool")


# ---------------------------------------------------------------------------------- per token
def ppo_policy_loss(logp: Array, old_logp: Array, advantages: Array, eps_clip: float = 0.2,
                    eps_clip_high: float = 0.28, dual_clip: float | None = None
                    ) -> tuple[Array, Array]:
    """Asymmetric PPO clip (SPEC §1). All inputs share one shape `[...]`.

    ratio = exp(logp − old_logp); l1 = −ratio·A; l2 = −clip(ratio, 1−ε, 1+ε_high)·A;
    l = max(l1, l2); with dual clip c > 1, where A < 0: l = min(l, −c·A).
    Returns `(per_token_loss, clipped)`; `clipped` is 1.0 where l2 > l1, else 0.0.
    """
    ratio = jnp.exp(logp - old_logp)
    l1 = -ratio * advantages
    l2 = -jnp.clip(ratio, 1.0 - eps_clip, 1.0 + eps_clip_high) * advantages
    loss = jnp.maximum(l1, l2)
    clipped = (l2 > l1).astype(loss.dtype)
    if dual_clip is not None:
        loss = jnp.where(advantages < 0, jnp.minimum(loss, -dual_clip * advantages), loss)
    return loss, clipped


def kl_penalty(logp: Array, ref_logp: Array, kind: str = "low_var_kl") -> Array:
    """Per-token KL estimate to a reference policy (SPEC §3), same shape as `logp`.

    k1 = logp − ref; k2 = (logp − ref)²/2; low_var_kl (k3) = exp(ref − logp) − 1 − (ref − logp)
    clamped to [−10, 10]. For k3 the log-ratio is first clamped to ±20, which changes no value
    (k3 already exceeds 10 there) but keeps exp finite so gradients stay finite.
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * jnp.square(logp - ref_logp)
    if kind == "low_var_kl":
        log_ratio = jnp.clip(ref_logp - logp, -20.0, 20.0)
        k3 = jnp.exp(log_ratio) - 1.0 - log_ratio
        return jnp.clip(k3, -LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)
    raise ValueError(f"kl_penalty kind = {kind!r}, expected one of {KL_KINDS}")


def _log_tail(bins_logp: Array) -> Array:
    """log of the probability mass outside the K bins: log(1 − exp(min(lse(bins), −1e−7))).

    Evaluated as 1 − Σ p_k = −expm1(log p_top) − Σ_{k ≠ top} p_k, which equals the formula
    but keeps float32 precision when one bin holds nearly all the mass (a peaked teacher, where
    1 − exp(lse) would cancel catastrophically)."""
    top = jnp.max(bins_logp, axis=-1)
    not_top = 1.0 - jax.nn.one_hot(jnp.argmax(bins_logp, axis=-1), bins_logp.shape[-1],
                                   dtype=bins_logp.dtype)
    rest = jnp.sum(jnp.exp(bins_logp) * not_top, axis=-1)
    floor = -jnp.expm1(jnp.asarray(TOPK_TAIL_MAX_LOGSUMEXP, bins_logp.dtype))
    return jnp.log(jnp.maximum(-jnp.expm1(top) - rest, floor))


def topk_reverse_kl(student_topk_logp: Array, teacher_topk_logp: Array) -> Array:
    """Reverse KL(student ‖ teacher) over the teacher's top-K ids plus one tail bin (SPEC §5).

    Inputs `[..., K]`: log-probs of student and teacher at the teacher's top-K token ids.
    Returns `[...]`: Σ_{k=1..K+1} p_s,k (log p_s,k − log p_t,k), the tail bin holding the mass
    outside the K ids for each of the two distributions.
    """
    s = jnp.concatenate([student_topk_logp, _log_tail(student_topk_logp)[..., None]], axis=-1)
    t = jnp.concatenate([teacher_topk_logp, _log_tail(teacher_topk_logp)[..., None]], axis=-1)
    return jnp.sum(jnp.exp(s) * (s - t), axis=-1)


# ---------------------------------------------------------------------------------- advantages
def binary_rl_advantages(rewards: Array) -> Array:
    """Binary RL (SPEC §2): A_t = r, the sample's scalar reward already broadcast over its
    tokens (`[R, L]`, as `pack` lays it out). No normalisation. Stop-gradient."""
    return jax.lax.stop_gradient(_floating(rewards))


def opd_advantages(teacher_logp: Array, old_logp: Array, teacher_mask: Array) -> Array:
    """OPD (SPEC §2): A_t = m_t · (teacher_logp_t − old_logp_t), `[R, L]`, stop-gradient.
    Where `teacher_mask` is 0 the advantage is exactly 0 whatever `teacher_logp` holds."""
    diff = jnp.where(jnp.asarray(teacher_mask) > 0,
                     jnp.asarray(teacher_logp) - jnp.asarray(old_logp), 0.0)
    return jax.lax.stop_gradient(_floating(diff))


def combined_advantages(batch: Any, w_rl: float = 1.0, w_opd: float = 1.0) -> Array:
    """A_t = w_rl · r + w_opd · m_t · (teacher_logp_t − old_logp_t) (SPEC §2), `[R, L]`.
    `batch` is a `TokenBatch` (any object with `rewards, teacher_logp, old_logp,
    teacher_mask`). Stop-gradient: teacher terms are constants."""
    return (w_rl * binary_rl_advantages(batch.rewards)
            + w_opd * opd_advantages(batch.teacher_logp, batch.old_logp, batch.teacher_mask))


def grpo_advantages(rewards: Array, group_ids: Array, scale_by_std: bool = True,
                    eps: float = 1e-6) -> Array:
    """Group-normalised advantages (GRPO option of SPEC §2), per sample.

    rewards `[N]` float, group_ids `[N]` int (any values; equal id ⇒ same prompt group).
    A_i = r_i − mean_g(r); with `scale_by_std`, divided by (std_g(r) + eps) where std is the
    unbiased (ddof=1) group standard deviation, as torch's default; a group of one has std 0
    and advantage 0. O(N²) in the number of samples, which is small.
    """
    r = _floating(rewards)
    same = (group_ids[:, None] == group_ids[None, :]).astype(r.dtype)   # [N, N]
    count = jnp.sum(same, axis=1)
    mean = same @ r / count
    centred = r - mean
    if not scale_by_std:
        return jax.lax.stop_gradient(centred)
    var = same @ jnp.square(r) / count - jnp.square(mean)
    var = jnp.maximum(var, 0.0) * count / jnp.maximum(count - 1.0, 1.0)
    return jax.lax.stop_gradient(centred / (jnp.sqrt(var) + eps))


# ---------------------------------------------------------------------------------- reduction
def reduce(values: Array, loss_mask: Array, segment_ids: Array, mode: str
           ) -> tuple[Array, Array]:
    """Reduces per-token `values [R, L]` over tokens with loss_mask > 0 (SPEC §4).

    `token_mean`: (Σ masked values, number of masked tokens).
    `sample_mean`: a sample is a (row, segment id ≠ 0) pair; (Σ over samples with ≥ 1 masked
    token of their masked mean, number of such samples).
    Masked-out values are replaced (not multiplied) by 0, so NaN/inf there changes nothing and
    gets exactly zero gradient. Divide with `sum / max(denominator, 1)`.
    """
    mask = (loss_mask > 0) & (segment_ids > 0)
    v = _floating(jnp.where(mask, values, 0.0))
    m = mask.astype(v.dtype)
    if mode == "token_mean":
        return jnp.sum(v), jnp.sum(m)
    if mode != "sample_mean":
        raise ValueError(f"reduce mode = {mode!r}, expected one of {REDUCTIONS}")
    length = v.shape[-1]
    v2, m2 = v.reshape(-1, length), m.reshape(-1, length)
    rows = v2.shape[0]
    seg = segment_ids.reshape(-1, length).astype(jnp.int32)
    ids = (seg + (length + 1) * jnp.arange(rows, dtype=jnp.int32)[:, None]).reshape(-1)
    num = rows * (length + 1)
    sums = jax.ops.segment_sum(v2.reshape(-1), ids, num_segments=num)
    counts = jax.ops.segment_sum(m2.reshape(-1), ids, num_segments=num)
    has = counts > 0
    means = jnp.where(has, sums / jnp.where(has, counts, 1.0), 0.0)
    return jnp.sum(means), jnp.sum(has.astype(v.dtype))


def divide_terms(terms: Terms) -> dict[str, Array]:
    """(sum, denominator) pairs → values: sum / max(denominator, 1) (0 when nothing counted)."""
    return {k: s / jnp.maximum(d, 1.0) for k, (s, d) in terms.items()}


def add_terms(a: Terms, b: Terms) -> Terms:
    """Adds two `combined_loss_terms` results key by key (micro-batch accumulation)."""
    if set(a) != set(b):
        raise ValueError(f"add_terms: keys {sorted(a)} and {sorted(b)} differ")
    return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in a}


# ---------------------------------------------------------------------------------- combined
def combined_loss_terms(logp: Array, batch: Any, config: LossConfig,
                        entropy: Array | None = None,
                        student_topk_logp: Array | None = None) -> Terms:
    """The combined loss and its metrics as un-divided `(sum, denominator)` pairs.

    logp `[R, L]` (current policy, aligned like the batch), entropy `[R, L]` or None,
    student_topk_logp `[R, L, K]` (the student's log-probs at `batch.teacher_topk_ids`) or None.
    Keys (every per-token key reduced with `config.reduction` over loss-masked tokens, so all
    share one denominator): `loss`, `pg_loss`, `clipfrac`, `ppo_kl` (old_logp − logp),
    `advantage_mean`; `tis_weight` with `use_tis`; `kl` when `batch.ref_logp` is present;
    `entropy` when given; `topk_kl` when the batch has top-K teacher data and
    `student_topk_logp` is given. Counts: `num_tokens` (masked tokens) and `num_samples`
    (samples with ≥ 1 masked token) as (count, 0), so they add across micro-batches and
    `divide_terms` leaves them as counts.
    Micro-batches: add the pairs (`add_terms`), then `divide_terms` once; the gradient of the
    full-batch loss is Σ grad(loss sum) / Σ loss denominator.
    """
    shape = tuple(batch.loss_mask.shape)
    for name, value, want in (("logp", logp, shape), ("entropy", entropy, shape),
                              ("student_topk_logp", student_topk_logp, None)):
        if value is None:
            continue
        want = want or shape + tuple(jnp.shape(batch.teacher_topk_logp)[-1:])
        if tuple(jnp.shape(value)) != want:
            raise ValueError(f"combined_loss: {name} has shape {tuple(jnp.shape(value))}, "
                             f"expected {want} (the batch's [R, L]{', K' if want != shape else ''})")
    mask = (jnp.asarray(batch.loss_mask) > 0) & (jnp.asarray(batch.segment_ids) > 0)
    old = jnp.asarray(batch.old_logp)
    # Masked positions see logp = old_logp (ratio 1, zero KL) through `where`: exactly zero
    # gradient there and no NaN leaking from whatever values they hold.
    logp_m = jnp.where(mask, logp, old)
    adv = jnp.where(mask, combined_advantages(batch, config.w_rl, config.w_opd), 0.0)
    pg, clipped = ppo_policy_loss(logp_m, old, adv, config.eps_clip, config.eps_clip_high,
                                  config.dual_clip)

    def red(values):
        return reduce(values, mask, batch.segment_ids, config.reduction)

    terms: Terms = {}
    if config.use_tis:
        log_w = jnp.where(mask, old - jnp.asarray(batch.rollout_logp), 0.0)
        tis = jnp.minimum(jnp.exp(jnp.minimum(log_w, 30.0)), config.tis_cap)
        tis = jax.lax.stop_gradient(tis)
        pg = pg * tis
        terms["tis_weight"] = red(tis)
    total = pg
    terms["pg_loss"] = red(pg)
    terms["clipfrac"] = red(clipped)
    terms["ppo_kl"] = red(old - logp_m)
    terms["advantage_mean"] = red(adv)

    ref = getattr(batch, "ref_logp", None)
    if ref is not None:
        kl = kl_penalty(logp_m, jnp.where(mask, jnp.asarray(ref), old), config.kl_kind)
        terms["kl"] = red(kl)
        total = total + config.kl_coef * kl
    elif config.kl_coef > 0:
        raise ValueError(f"LossConfig.kl_coef = {config.kl_coef} > 0 needs batch.ref_logp, "
                         "got None")
    if entropy is not None:
        ent = jnp.where(mask, entropy, 0.0)
        terms["entropy"] = red(ent)
        total = total - config.entropy_coef * ent
    elif config.entropy_coef != 0:
        raise ValueError(f"LossConfig.entropy_coef = {config.entropy_coef} ≠ 0 needs the "
                         "entropy argument, got None")

    teacher_topk = getattr(batch, "teacher_topk_logp", None)
    if teacher_topk is not None and student_topk_logp is not None:
        teacher_topk = jnp.asarray(teacher_topk)
        topk_mask = mask & (jnp.asarray(batch.teacher_topk_mask) > 0)
        safe = jnp.where(topk_mask[..., None], student_topk_logp, teacher_topk)
        tk = jnp.where(topk_mask, topk_reverse_kl(safe, teacher_topk), 0.0)
        terms["topk_kl"] = red(tk)
        total = total + config.topk_coef * tk
    elif teacher_topk is not None and config.topk_coef > 0:
        raise ValueError(f"LossConfig.topk_coef = {config.topk_coef} > 0 and the batch has "
                         "top-K teacher data: pass student_topk_logp [R, L, K]")

    terms["loss"] = red(total)
    n_tok, _ = reduce(jnp.ones_like(logp_m), mask, batch.segment_ids, "token_mean")
    _, n_samples = reduce(jnp.ones_like(logp_m), mask, batch.segment_ids, "sample_mean")
    # Counts carry denominator 0: they add up across micro-batches and `divide_terms`
    # (which divides by max(denominator, 1)) returns them unchanged.
    zero = jnp.zeros((), n_tok.dtype)
    terms["num_tokens"] = (n_tok, zero)
    terms["num_samples"] = (n_samples, zero)
    return terms


def combined_loss(logp: Array, batch: Any, config: LossConfig, entropy: Array | None = None,
                  student_topk_logp: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """`(loss, metrics)`: `combined_loss_terms` with every pair already divided.

    loss = pg − entropy_coef·entropy + kl_coef·kl (+ topk_coef·topk_kl), reduced per
    `config.reduction`. Every metric in the dict is already divided (a mean under
    `config.reduction`), except `num_tokens` and `num_samples`, which are plain counts (masked
    tokens; samples with ≥ 1 masked token). `metrics["loss"]` equals `loss`.
    """
    metrics = divide_terms(combined_loss_terms(logp, batch, config, entropy, student_topk_logp))
    return metrics["loss"], metrics


# ---------------------------------------------------------------------------------- log-probs
def _vocab_block(h: Array, lm_head: Array, i: Array, c: int, dtype: Any):
    """Block i of the vocabulary walk: columns [start, start + c) with start = min(i·c, V − c),
    so every block has c columns and the last one may overlap its predecessor.
    Returns (start, lm_head block `[D, c]` in dtype, logits `[B, T, c]`, fresh `[c]`) where
    `fresh` marks the columns no earlier block covered (col ≥ i·c)."""
    v = lm_head.shape[1]
    start = jnp.minimum(i * c, v - c)
    w_c = jax.lax.dynamic_slice_in_dim(lm_head, start, c, axis=1).astype(dtype)
    logits = jnp.einsum("BTD,DV->BTV", h, w_c)
    fresh = start + jnp.arange(c) >= i * c
    return start, w_c, logits, fresh


def _block_stats(logits: Array, fresh: Array) -> tuple[Array, Array, Array]:
    """Softmax statistics of one block's fresh columns, each `[B, T]`: m = max z,
    s = Σ exp(z − m), a = Σ exp(z − m)·(z − m)."""
    m = jnp.max(jnp.where(fresh, logits, -jnp.inf), axis=-1)
    shifted = jnp.where(fresh, logits - m[..., None], 0.0)
    e = jnp.where(fresh, jnp.exp(shifted), 0.0)
    return m, jnp.sum(e, axis=-1), jnp.sum(e * shifted, axis=-1)


def _merge_stats(x: tuple[Array, Array, Array], y: tuple[Array, Array, Array]):
    """(m, s, a) of the union of two disjoint column sets (online softmax): rescales both to
    the larger max; a uses Σ e^{z−m'}(z−m') = e^{m−m'}(a + (m − m')·s)."""
    (m1, s1, a1), (m2, s2, a2) = x, y
    m = jnp.maximum(m1, m2)
    d1, d2 = m1 - m, m2 - m
    e1, e2 = jnp.exp(d1), jnp.exp(d2)
    return m, s1 * e1 + s2 * e2, e1 * (a1 + d1 * s1) + e2 * (a2 + d2 * s2)


def _compute_dtype(hidden: Array, lm_head: Array) -> Any:
    return jnp.promote_types(jnp.promote_types(hidden.dtype, lm_head.dtype), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _vocab_scan(h: Array, lm_head: Array, ids: Array, c: int) -> tuple[Array, Array]:
    """h `[B, T, D]`, lm_head `[D, V]`, ids `[B, T, K]` int32, vocabulary block c ≤ V →
    (log π(ids) `[B, T, K]`, entropy `[B, T]`) in the compute dtype."""
    return _vocab_scan_fwd(h, lm_head, ids, c)[0]


def _vocab_scan_fwd(h, lm_head, ids, c):
    """One online pass over vocabulary blocks: running (max, Σe, Σe·(z − max)) and the logits
    at ids; saves only `[B, T]` log-normaliser and entropy (besides the inputs)."""
    dtype = _compute_dtype(h, lm_head)
    hd = h.astype(dtype)
    n_blocks = -(-lm_head.shape[1] // c)

    def block(i):
        start, _, logits, fresh = _vocab_block(hd, lm_head, i, c, dtype)
        hit = (ids >= i * c) & (ids < start + c)
        at_ids = jnp.take_along_axis(logits, jnp.clip(ids - start, 0, c - 1), axis=-1)
        return _block_stats(logits, fresh), jnp.where(hit, at_ids, 0.0)

    def step(carry, i):
        stats, at_ids = carry
        new_stats, new_at_ids = block(i)
        return (_merge_stats(stats, new_stats), at_ids + new_at_ids), None

    (m, s, a), at_ids = jax.lax.scan(step, block(0), jnp.arange(1, n_blocks))[0]
    log_s = jnp.log(s)
    lse = m + log_s                                   # log Σ_V exp(z)
    entropy = log_s - a / s                           # lse − E_p[z], without cancellation
    logp = at_ids - lse[..., None]
    return (logp, entropy), (h, lm_head, ids, lse, entropy)


def _vocab_scan_bwd(c, residuals, cotangents):
    """Walks the vocabulary blocks again: dz = Σ_k g_k·(1[j = id_k] − p_j)
    − g_H·p_j·(log p_j + H); dW[:, block] = hᵀ·dz is written into a `[D, V]` loop carry (no
    accumulator: each column is written, never summed; an overlapping last block rewrites
    equal values) and dh += dz·W_blockᵀ over fresh columns only."""
    h, lm_head, ids, lse, entropy = residuals
    g_logp, g_entropy = cotangents
    dtype = _compute_dtype(h, lm_head)
    hd = h.astype(dtype)
    g_sum = jnp.sum(g_logp, axis=-1)[..., None]
    n_blocks = -(-lm_head.shape[1] // c)

    def step(carry, i):
        dh, dw = carry
        start, w_c, logits, fresh = _vocab_block(hd, lm_head, i, c, dtype)
        logsm = logits - lse[..., None]
        dz = -jnp.exp(logsm) * (g_sum + g_entropy[..., None] * (logsm + entropy[..., None]))
        cols = start + jnp.arange(c)
        for k in range(ids.shape[-1]):                # K is small: one fused elementwise pass
            dz = dz + jnp.where(cols == ids[..., k:k + 1], g_logp[..., k:k + 1], 0.0)
        dw_c = jnp.einsum("BTV,BTD->DV", dz, hd).astype(dw.dtype)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_c, start, axis=1)
        dh = dh + jnp.einsum("BTV,DV->BTD", jnp.where(fresh, dz, 0.0), w_c)
        return (dh, dw), None

    init = (jnp.zeros(h.shape, dtype), jnp.zeros_like(lm_head))
    dh, dw = jax.lax.scan(step, init, jnp.arange(n_blocks))[0]
    return dh.astype(h.dtype), dw, None


_vocab_scan.defvjp(_vocab_scan_fwd, _vocab_scan_bwd)


def _chunked_logp_entropy(hidden: Array, lm_head: Array, ids: Array, chunk: int
                          ) -> tuple[Array, Array]:
    """hidden `[..., T, D]`, lm_head `[D, V]`, ids `[..., T, K]` → (log π(ids) `[..., T, K]`,
    entropy `[..., T]`), float32 (float64 for float64 inputs).

    The leading dims are flattened to B rows that stay a batch dimension (so a data-parallel
    sharding of rows is kept). A scan walks the VOCABULARY `chunk` columns at a time (a
    `jax.custom_vjp`): the forward keeps an online log-sum-exp and entropy statistic, the
    backward recomputes each `[B, T, chunk]` logits block, writes its `[D, chunk]` slice of
    the lm_head gradient in place and accumulates the `[B, T, D]` hidden gradient. Neither pass
    holds `[B, T, V]` logits nor a separate `[D, V]` accumulator."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk = {chunk!r}, expected a positive int")
    lead, d = hidden.shape[:-1], hidden.shape[-1]
    k = ids.shape[-1]
    if not lead or ids.shape[:-1] != lead:
        raise ValueError(f"ids shape {ids.shape} does not match hidden {hidden.shape} (…, T)")
    if lm_head.ndim != 2 or lm_head.shape[0] != d:
        raise ValueError(f"lm_head shape {lm_head.shape}, expected (D={d}, V)")
    t = lead[-1]
    h = hidden.reshape(-1, t, d)                                   # [B, T, D]
    i = ids.reshape(-1, t, k).astype(jnp.int32)                    # [B, T, K]
    logp, entropy = _vocab_scan(h, lm_head, i, min(chunk, lm_head.shape[1]))
    return logp.reshape(*lead, k), entropy.reshape(lead)


def token_logp_and_entropy(hidden: Array, lm_head: Array, targets: Array, chunk: int = 512
                           ) -> tuple[Array, Array]:
    """(log π(targets), full-vocabulary entropy), each `[..., T]` float32, from hidden
    `[..., T, D]` and lm_head `[D, V]` (logits = hidden @ lm_head, computed in float32 even for
    bfloat16 inputs). `chunk` is the VOCABULARY block: forward and backward hold a few
    `[T, chunk]` logits blocks, never `[T, V]`, and the lm_head gradient is written block by
    block without a second `[D, V]` buffer. Gradients flow to `hidden` and `lm_head`."""
    logp, entropy = _chunked_logp_entropy(hidden, lm_head, targets[..., None], chunk)
    return logp[..., 0], entropy


def _shift(ids: Array, segment_ids: Array) -> tuple[Array, Array]:
    """The ids each hidden position predicts: `[R, L, ...]` ids → next ids (ids[t + 1] at t, 0
    at the last position) and valid `[R, L]` (t + 1 continues t's non-padding segment). The
    hidden states are used whole, not sliced, so no `[R, L−1, D]` copy is made."""
    nxt = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    valid = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return nxt, jnp.pad(valid, ((0, 0), (0, 1)))


def _unshift(values: Array, valid: Array) -> Array:
    """`[R, L, ...]` values about the next token → `[R, L, ...]` aligned like the tokens
    (value at t about tokens[t]); 0 at position 0 and where not valid (no gradient there)."""
    mask = valid.reshape(valid.shape + (1,) * (values.ndim - valid.ndim))
    values = jnp.where(mask, values, 0.0)[:, :-1]
    return jnp.pad(values, ((0, 0), (1, 0)) + ((0, 0),) * (values.ndim - 2))


def sequence_logp_and_entropy(hidden: Array, lm_head: Array, tokens: Array, segment_ids: Array,
                              chunk: int = 512) -> tuple[Array, Array]:
    """Packed-row log-probs: hidden `[R, L, D]`, lm_head `[D, V]`, tokens / segment_ids
    `[R, L]` → (logp `[R, L]`, entropy `[R, L]`), float32, aligned like `TokenBatch`: the value
    at t is about tokens[t], computed from hidden[t−1] of the same segment; positions that start
    a segment or are padding hold 0 (and pass no gradient). Memory-lean as
    `token_logp_and_entropy`."""
    ids, valid = _shift(tokens, segment_ids)
    logp, entropy = token_logp_and_entropy(hidden, lm_head, ids, chunk)
    return _unshift(logp, valid), _unshift(entropy, valid)


def sequence_logp_entropy_topk(hidden: Array, lm_head: Array, tokens: Array, segment_ids: Array,
                               topk_ids: Array, chunk: int = 512
                               ) -> tuple[Array, Array, Array]:
    """`sequence_logp_and_entropy` plus the student's log-probs at the teacher's top-K ids
    (`topk_ids [R, L, K]`, aligned like tokens: row t holds the ids for the prediction of
    tokens[t]) → (logp `[R, L]`, entropy `[R, L]`, topk_logp `[R, L, K]`), one pass."""
    ids = jnp.concatenate([tokens[..., None], topk_ids.astype(tokens.dtype)], axis=-1)
    ids, valid = _shift(ids, segment_ids)
    both, entropy = _chunked_logp_entropy(hidden, lm_head, ids, chunk)
    both = _unshift(both, valid)
    return both[..., 0], _unshift(entropy, valid), both[..., 1:]
