"""The combined PPO / OPD loss of OpenClaw-RL (SPEC.md §1–§5): pure, jit-able functions on arrays.

Imports jax, numpy and the standard library only, so other JAX projects can
`from clawjax import losses` without flax, grpc, torch or transformers.

Shapes: a packed batch is `[R, L]` (rows × token budget). The value at `[r, t]` is about the token
`tokens[r, t]` predicted from the tokens before it in the same segment; `segment_ids` are 1..n per
row and 0 is padding. Per-token functions also accept any leading shape `[...]`.

Reductions return `(sum, denominator)` pairs so that gradient accumulation over micro-batches can
add sums and denominators and divide once (exact, because a sample lives in one row of one
micro-batch and denominators do not depend on the parameters).

Log-probs and entropy from hidden states (`token_logp_and_entropy`, `sequence_logp_and_entropy`,
`sequence_logp_entropy_topk`) live in `clawjax.logprobs`, the top-K reverse KL
(`topk_reverse_kl`) in `clawjax.topk_kl`; both are re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

# Re-exported (`x as x`): parts of the public surface live in clawjax.logprobs / topk_kl.
from clawjax.logprobs import sequence_logp_and_entropy as sequence_logp_and_entropy
from clawjax.logprobs import sequence_logp_entropy_topk as sequence_logp_entropy_topk
from clawjax.logprobs import token_logp_and_entropy as token_logp_and_entropy
from clawjax.topk_kl import TOPK_TAIL_MAX_LOGSUMEXP as TOPK_TAIL_MAX_LOGSUMEXP
from clawjax.topk_kl import topk_reverse_kl as topk_reverse_kl
from clawjax.topk_kl import exp_minus_one_minus

Array = jax.Array
Terms = dict[str, tuple[Array, Array]]

REDUCTIONS = ("sample_mean", "token_mean")
KL_KINDS = ("k1", "k2", "low_var_kl")
LOW_VAR_KL_CLAMP = 10.0
PPO_MAX_LOG_RATIO = 20.0   # cap on logp − old_logp before exp (ppo_policy_loss)


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

    The log-ratio is capped at PPO_MAX_LOG_RATIO = 20 before exp: in float32 exp overflows to
    inf above ~88.7, and inf·0 (A = 0) or the inf gradient (A > 0) would turn the whole loss
    and its gradient into NaN. The cap changes no clipped value: where it acts the ratio is
    ≥ e^20 ≈ 4.9e8, above 1 + ε_high and the dual clip c (for any ε_high, c < 4.9e8), so for
    A > 0 (l = −(1+ε_high)·A), A = 0 (l = 0) and A < 0 with dual clip (l = −c·A) the value
    and its zero gradient are exactly the formula's. Only the unbounded branch (A < 0, no
    dual clip: l = l1 = −ratio·A) is capped there, at e^20·|A| with zero gradient, instead of
    a value ≥ 4.9e8·|A| that float32 may not even hold.
    """
    ratio = jnp.exp(jnp.minimum(logp - old_logp, PPO_MAX_LOG_RATIO))
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
    (k3 already exceeds 10 there) but keeps exp finite so gradients stay finite. k3 is
    evaluated without cancellation (`exp_minus_one_minus`): near logp = ref it is ~x²/2, far
    below the float32 rounding of e^x, and the naive form gave negative, noisy values there.
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * jnp.square(logp - ref_logp)
    if kind == "low_var_kl":
        log_ratio = jnp.clip(ref_logp - logp, -20.0, 20.0)
        k3 = exp_minus_one_minus(log_ratio)
        return jnp.clip(k3, -LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)
    raise ValueError(f"kl_penalty kind = {kind!r}, expected one of {KL_KINDS}")


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


def _group_sum(same: Array, x: Array) -> Array:
    """Σ of `x [N]` over each sample's group, `[N]`, from the `[N, N]` 0/1 `same` matrix.

    An elementwise product and sum rather than a matmul, so every device adds in full float32
    (a float32 matmul may run in TF32 or bfloat16 on accelerators)."""
    return jnp.sum(same * x[None, :], axis=1)


def grpo_advantages(rewards: Array, group_ids: Array, scale_by_std: bool = True,
                    eps: float = 1e-6) -> Array:
    """Group-normalised advantages (GRPO option of SPEC §2), per sample.

    rewards `[N]` float, group_ids `[N]` int (any values; equal id ⇒ same prompt group).
    A_i = r_i − mean_g(r); with `scale_by_std`, divided by (std_g(r) + eps) where std is the
    unbiased (ddof=1) group standard deviation, as torch's default; a group of one has std 0
    and advantage 0. O(N²) in the number of samples, which is small.

    Float-safe (shifted data, two passes): each reward is first shifted by its group's first
    member's reward, so nearby rewards lose no digits ([3.0, 3.0001] → ±0.697, where
    E[r²] − E[r]² gives ±50); the variance is Σ_g (r − mean)² / (n − 1) of the centred values,
    so a group of equal rewards has exactly zero advantage.
    """
    r = _floating(rewards)
    group_ids = jnp.asarray(group_ids)
    same = (group_ids[:, None] == group_ids[None, :]).astype(r.dtype)   # [N, N]
    count = jnp.sum(same, axis=1)
    first = jnp.argmax(same, axis=1)            # index of the group's first member, [N]
    shifted = r - r[first]                      # 0 for that member, exact for equal rewards
    centred = shifted - _group_sum(same, shifted) / count
    if not scale_by_std:
        return jax.lax.stop_gradient(centred)
    var = _group_sum(same, jnp.square(centred)) / jnp.maximum(count - 1.0, 1.0)
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
    if student_topk_logp is not None and getattr(batch, "teacher_topk_logp", None) is None:
        raise ValueError(
            f"combined_loss: student_topk_logp has shape {tuple(jnp.shape(student_topk_logp))} "
            "but the batch carries no top-K teacher data (batch.teacher_topk_logp is None), so "
            "there is nothing to distil against: expected student_topk_logp = None")
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
