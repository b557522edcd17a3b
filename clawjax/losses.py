"""The combined PPO / OPD loss of OpenClaw-RL (SPEC.md §1–§5): pure, jit-able functions on arrays.

Imports jax, numpy and the standard library only, so other JAX projects can
`from clawjax import losses` without flax, grpc, torch or transformers.

Shapes: a packed batch is `[R, L]` (rows × token budget). The value at `[r, t]` is about the token
`tokens[r, t]` predicted from the tokens before it in the same segment; `segment_ids` are 1..n per
row (so never above L) and 0 is padding. Per-token functions also accept any leading shape `[...]`.
Shapes are checked at trace time (static under jit: no run-time cost), a mismatch raising
ValueError naming the argument, its shape and the one expected; values are not checked.
Dtypes: losses are computed in at least float32 (float16 / bfloat16 inputs are upcast), so results
are float32, or float64 for float64 inputs (x64); gradients come back in each input's dtype.

Reductions return `(sum, denominator)` pairs so that gradient accumulation over micro-batches can
add sums and denominators and divide once (exact, because a sample lives in one row of one
micro-batch and denominators do not depend on the parameters).

Log-probs and entropy from hidden states (`token_logp_and_entropy`, `sequence_logp_and_entropy`,
`sequence_logp_entropy_topk`) live in `clawjax.logprobs` and are re-exported here; the top-K reverse
KL's formula lives in `clawjax.topk_kl` (`topk_reverse_kl` here checks and upcasts its inputs).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

# Re-exported (`x as x`): parts of the public surface live in clawjax.logprobs / topk_kl.
from clawjax.logprobs import sequence_logp_and_entropy as sequence_logp_and_entropy
from clawjax.logprobs import sequence_logp_entropy_topk as sequence_logp_entropy_topk
from clawjax.logprobs import token_logp_and_entropy as token_logp_and_entropy
from clawjax import topk_kl
from clawjax.topk_kl import TOPK_TAIL_MAX_LOGSUMEXP as TOPK_TAIL_MAX_LOGSUMEXP
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


def _check_shapes(fn: str, want: tuple, why: str, arrays: dict[str, Any]) -> None:
    """Raises ValueError naming the first of `arrays` (name → array; None is skipped) whose shape
    is not `want`. Shapes are static, so under jit this runs once, at trace time."""
    for name, x in arrays.items():
        if x is not None and tuple(jnp.shape(x)) != tuple(want):
            raise ValueError(f"{fn}: {name} has shape {tuple(jnp.shape(x))}, expected "
                             f"{tuple(want)} ({why})")


def _as_float(value: Any) -> float | None:
    """`value` as a Python float if it is one real number (a Python or NumPy int / float scalar,
    or a concrete 0-d NumPy / JAX int / float array), else None (bools, strings, tracers, …)."""
    dtype = getattr(value, "dtype", None)
    real_0d = getattr(value, "shape", None) == () and dtype is not None and (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or real_0d):
        return None
    try:
        return float(value)
    except TypeError:          # a tracer (ConcretizationTypeError): no static value
        return None


# ---------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Coefficients of the combined loss. Frozen and hashable: usable as a static jit argument.

    loss = pg − entropy_coef · entropy + kl_coef · kl + topk_coef · topk_kl, every term a
    per-token quantity reduced with `reduction` over loss-masked tokens.
    `use_tis` multiplies the per-token policy loss by the truncated importance weight
    min(exp(old_logp − rollout_logp), tis_cap) (a constant: no gradient flows through it).
    Numeric fields take a real scalar (Python, NumPy, or 0-d array: `np.float32(0.5)`; not a
    bool) and store a Python float; `use_tis` takes a Python or NumPy bool.
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
            value = _as_float(getattr(self, name))
            if value is None:
                fail(name, f"a real number, not a bool ({expected}); got "
                           f"{type(getattr(self, name)).__name__}")
            if not math.isfinite(value) or not ok(value):
                fail(name, expected)
            object.__setattr__(self, name, value)

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
        if getattr(self.use_tis, "shape", None) == () and getattr(self.use_tis, "dtype", 0) == bool:
            object.__setattr__(self, "use_tis", bool(self.use_tis))   # np.bool_, 0-d bool array
        if not isinstance(self.use_tis, bool):
            fail("use_tis", "a bool")


# ---------------------------------------------------------------------------------- per token
def ppo_policy_loss(logp: Array, old_logp: Array, advantages: Array, eps_clip: float = 0.2,
                    eps_clip_high: float = 0.28, dual_clip: float | None = None
                    ) -> tuple[Array, Array]:
    """Asymmetric PPO clip (SPEC §1). All inputs share one shape `[...]` (checked: a per-sample
    advantage `[R]` beside logp `[R, L]` must be broadcast over its tokens first).

    ratio = exp(logp − old_logp); l1 = −ratio·A; l2 = −clip(ratio, 1−ε, 1+ε_high)·A;
    l = max(l1, l2); with dual clip c > 1, where A < 0: l = min(l, −c·A).
    Returns `(per_token_loss, clipped)` in at least float32 (half-precision inputs are upcast);
    `clipped` is 1.0 where l2 > l1, else 0.0.

    The max (and the dual-clip min) take a clipped branch only where it is strictly better, so at
    a tie the gradient is −ratio·A: the true one where the loss is smooth at a bound (ratio = 1−ε
    with A > 0, ratio = 1+ε_high with A < 0); jnp.maximum split it there (0.75×).
    The log-ratio is capped at PPO_MAX_LOG_RATIO = 20 before exp (float32 exp overflows above
    ~88.7, and inf·0 is NaN). The ratio is then ≥ e^20, beyond 1 + ε_high and any dual clip, so
    values and zero gradients stay the formula's except on the unbounded branch (A < 0, no dual
    clip), capped at e^20·|A| with zero gradient.
    """
    _check_shapes("ppo_policy_loss", jnp.shape(logp), "logp's shape: all inputs share one shape",
                  {"old_logp": old_logp, "advantages": advantages})
    logp, old_logp, advantages = map(_floating, (logp, old_logp, advantages))
    ratio = jnp.exp(jnp.minimum(logp - old_logp, PPO_MAX_LOG_RATIO))
    l1 = -ratio * advantages
    l2 = -jnp.clip(ratio, 1.0 - eps_clip, 1.0 + eps_clip_high) * advantages
    clipped = l2 > l1
    loss = jnp.where(clipped, l2, l1)
    if dual_clip is not None:
        bound = -dual_clip * advantages
        loss = jnp.where((advantages < 0) & (bound < loss), bound, loss)
    return loss, clipped.astype(loss.dtype)


def kl_penalty(logp: Array, ref_logp: Array, kind: str = "low_var_kl") -> Array:
    """Per-token KL estimate to a reference policy (SPEC §3): logp and ref_logp `[...]` (one
    shape, checked) → `[...]` in at least float32 (half-precision inputs are upcast).

    k1 = logp − ref; k2 = (logp − ref)²/2; low_var_kl (k3) = exp(ref − logp) − 1 − (ref − logp)
    clamped to [−10, 10]. For k3 the log-ratio is first clamped to ±20 (no value changes: k3 > 10
    there; exp and gradients stay finite), and k3 is evaluated without cancellation
    (`exp_minus_one_minus`: near logp = ref the naive form gave negative, noisy values).
    """
    _check_shapes("kl_penalty", jnp.shape(logp), "logp's shape", {"ref_logp": ref_logp})
    logp, ref_logp = _floating(logp), _floating(ref_logp)
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * jnp.square(logp - ref_logp)
    if kind == "low_var_kl":
        log_ratio = jnp.clip(ref_logp - logp, -20.0, 20.0)
        k3 = exp_minus_one_minus(log_ratio)
        return jnp.clip(k3, -LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)
    raise ValueError(f"kl_penalty kind = {kind!r}, expected one of {KL_KINDS}")


def topk_reverse_kl(student_topk_logp: Array, teacher_topk_logp: Array) -> Array:
    """Reverse KL(student ‖ teacher) over the teacher's top-K ids plus one tail bin (SPEC §5):
    `clawjax.topk_kl.topk_reverse_kl` (the formula, evaluated without cancellation) on inputs
    `[..., K]` of one shape (checked) computed in at least float32. Returns `[...]`."""
    _check_shapes("topk_reverse_kl", jnp.shape(student_topk_logp),
                  "student_topk_logp's shape [..., K]", {"teacher_topk_logp": teacher_topk_logp})
    return topk_kl.topk_reverse_kl(_floating(student_topk_logp), _floating(teacher_topk_logp))


# ---------------------------------------------------------------------------------- advantages
def binary_rl_advantages(rewards: Array) -> Array:
    """Binary RL (SPEC §2): A_t = r, the sample's scalar reward already broadcast over its
    tokens (`[R, L]`, as `pack` lays it out). No normalisation. Stop-gradient."""
    return jax.lax.stop_gradient(_floating(rewards))


def opd_advantages(teacher_logp: Array, old_logp: Array, teacher_mask: Array) -> Array:
    """OPD (SPEC §2): A_t = m_t · (teacher_logp_t − old_logp_t), `[R, L]`, stop-gradient.
    Where `teacher_mask` is 0 the advantage is exactly 0 whatever `teacher_logp` holds."""
    _check_shapes("opd_advantages", jnp.shape(old_logp), "old_logp's shape",
                  {"teacher_logp": teacher_logp, "teacher_mask": teacher_mask})
    diff = jnp.where(jnp.asarray(teacher_mask) > 0,
                     _floating(teacher_logp) - _floating(old_logp), 0.0)
    return jax.lax.stop_gradient(diff)


def combined_advantages(batch: Any, w_rl: float = 1.0, w_opd: float = 1.0) -> Array:
    """A_t = w_rl · r + w_opd · m_t · (teacher_logp_t − old_logp_t) (SPEC §2), `[R, L]`.
    `batch` is a `TokenBatch` (any object with `rewards, teacher_logp, old_logp,
    teacher_mask`, all one shape: checked). Stop-gradient: teacher terms are constants."""
    _check_shapes("combined_advantages", jnp.shape(batch.old_logp), "batch.old_logp's shape",
                  {"batch.rewards": batch.rewards})
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

    Float-safe: rewards are shifted by their group's first member's, so nearby rewards lose no
    digits ([3.0, 3.0001] → ±0.697, not ±50), and the variance is taken of the centred values
    (two passes), so a group of equal rewards has exactly zero advantage.
    """
    _check_shapes("grpo_advantages", tuple(jnp.shape(rewards))[:1] or ("N",),
                  "[N]: one scalar reward per sample", {"rewards": rewards, "group_ids": group_ids})
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

    values, loss_mask and segment_ids share one shape `[..., L]` (checked; leading dims are rows).
    `token_mean`: (Σ masked values, number of masked tokens).
    `sample_mean`: a sample is a (row, segment id ≠ 0) pair; (Σ over samples with ≥ 1 masked
    token of their masked mean, number of such samples).
    Masked-out values are replaced (not multiplied) by 0, so NaN/inf there changes nothing and
    gets exactly zero gradient. Divide with `sum / max(denominator, 1)`.

    Invariant, not checked (values are invisible under jit): segment ids are 1..n per row
    (0 = padding), so never above L, as `clawjax.batch.pack` writes them. `sample_mean` keys a
    sample on id + (L + 1)·row: an id above L (ids numbered across the batch, arbitrary labels)
    is silently merged into a sample of the next row or dropped. Renumber per row first.
    """
    _check_shapes("reduce", jnp.shape(values), "values' shape [..., L]",
                  {"loss_mask": loss_mask, "segment_ids": segment_ids})
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
_BATCH_FIELDS = ("segment_ids", "old_logp", "rollout_logp", "teacher_logp", "teacher_mask",
                 "rewards", "ref_logp", "teacher_topk_mask")


def _check_batch(logp: Array, batch: Any, entropy: Array | None, student_topk_logp: Array | None):
    """combined_loss's shape contract: logp, entropy and the batch's `[R, L]` fields have
    `loss_mask`'s shape, the top-K arrays `[R, L, K]` with the teacher's K."""
    shape = tuple(jnp.shape(batch.loss_mask))
    teacher_topk = getattr(batch, "teacher_topk_logp", None)
    if student_topk_logp is not None and teacher_topk is None:
        raise ValueError(
            f"combined_loss: student_topk_logp has shape {tuple(jnp.shape(student_topk_logp))} "
            "but the batch carries no top-K teacher data (batch.teacher_topk_logp is None), so "
            "there is nothing to distil against: expected student_topk_logp = None")
    fields = {f"batch.{name}": getattr(batch, name, None) for name in _BATCH_FIELDS}
    _check_shapes("combined_loss", shape, "the batch's [R, L], loss_mask's shape",
                  {"logp": logp, "entropy": entropy, **fields})
    if teacher_topk is not None:      # [R, L, K]; "K" (never equal) when the rank is wrong
        k = jnp.shape(teacher_topk)[-1] if jnp.ndim(teacher_topk) == len(shape) + 1 else "K"
        _check_shapes("combined_loss", shape + (k,), "the batch's [R, L], K",
                      {"batch.teacher_topk_logp": teacher_topk,
                       "student_topk_logp": student_topk_logp})


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

    Shapes are checked (each array read is `loss_mask`'s `[R, L]`, or `[R, L, K]`); segment ids
    are not: they must be 1..n per row, never above L (see `reduce`). Computed in ≥ float32.
    """
    _check_batch(logp, batch, entropy, student_topk_logp)
    mask = (jnp.asarray(batch.loss_mask) > 0) & (jnp.asarray(batch.segment_ids) > 0)
    logp, old = _floating(logp), _floating(batch.old_logp)
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
        log_w = jnp.where(mask, old - _floating(batch.rollout_logp), 0.0)
        tis = jax.lax.stop_gradient(jnp.minimum(jnp.exp(jnp.minimum(log_w, 30.0)), config.tis_cap))
        pg = pg * tis
        terms["tis_weight"] = red(tis)
    total = pg
    terms["pg_loss"] = red(pg)
    terms["clipfrac"] = red(clipped)
    terms["ppo_kl"] = red(old - logp_m)
    terms["advantage_mean"] = red(adv)

    ref = getattr(batch, "ref_logp", None)
    if ref is not None:
        kl = kl_penalty(logp_m, jnp.where(mask, _floating(ref), old), config.kl_kind)
        terms["kl"] = red(kl)
        total = total + config.kl_coef * kl
    elif config.kl_coef > 0:
        raise ValueError(f"LossConfig.kl_coef = {config.kl_coef} > 0 needs batch.ref_logp, "
                         "got None")
    if entropy is not None:
        ent = jnp.where(mask, _floating(entropy), 0.0)
        terms["entropy"] = red(ent)
        total = total - config.entropy_coef * ent
    elif config.entropy_coef != 0:
        raise ValueError(f"LossConfig.entropy_coef = {config.entropy_coef} ≠ 0 needs the "
                         "entropy argument, got None")

    teacher_topk = getattr(batch, "teacher_topk_logp", None)
    if teacher_topk is not None and student_topk_logp is not None:
        teacher_topk = _floating(teacher_topk)
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
    """`(loss, metrics)`: `combined_loss_terms` with every pair already divided (same inputs,
    same checks; segment ids must be 1..n per row, never above L: not checked, see `reduce`).

    loss = pg − entropy_coef·entropy + kl_coef·kl (+ topk_coef·topk_kl), reduced per
    `config.reduction`. Every metric in the dict is already divided (a mean under
    `config.reduction`), except `num_tokens` and `num_samples`, which are plain counts (masked
    tokens; samples with ≥ 1 masked token). `metrics["loss"]` equals `loss`.
    """
    metrics = divide_terms(combined_loss_terms(logp, batch, config, entropy, student_topk_logp))
    return metrics["loss"], metrics
