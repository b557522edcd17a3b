"""The top-K reverse KL of SPEC §5: the teacher's top-K bins plus a tail bin, no cancellation.

`topk_reverse_kl(student [..., K], teacher [..., K]) -> [...]` is
Σ_{k=1..K+1} p_s,k (log p_s,k − log p_t,k), the tail bin holding the mass outside the K ids,
log_tail = log(1 − exp(min(lse, −1e−7))). Pure jax.numpy; `clawjax.losses.topk_reverse_kl` is it
with checked shapes and inputs upcast to at least float32. Float32 stays accurate for nearly
equal distributions (self-distillation) and for peaked teachers: see each helper's docstring.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

TOPK_TAIL_MAX_LOGSUMEXP = -1e-7
EXP_SERIES_MAX = 0.5      # |x| below which e^x − 1 − x is summed as its Taylor series


def exp_minus_one_minus(x: Array) -> Array:
    """φ(x) = e^x − 1 − x ≥ 0, elementwise, without the cancellation of the naive form.

    For |x| < 0.5 it is Σ_{n=2..16} xⁿ/n! (Horner; truncation < 1e−19 relative, below float64
    rounding), whose derivative Σ_{n=1..15} xⁿ/n! is as accurate; elsewhere expm1(x) − x, whose
    terms no longer cancel badly (≤ ~20 ulps). The unused branch sees x = 0 (series) or is
    finite for the |x| ≤ 20 callers pass, so no NaN leaks into gradients through `where`."""
    small = jnp.abs(x) < EXP_SERIES_MAX
    xs = jnp.where(small, x, 0.0)
    poly = jnp.zeros_like(xs)
    for n in range(16, 1, -1):
        poly = poly * xs + 1.0 / math.factorial(n)
    return jnp.where(small, xs * xs * poly, jnp.expm1(x) - x)


def _tail_mass(bins_logp: Array) -> Array:
    """1 − Σ_k exp(bins_k), `[...]` (may be ≤ 0 when the bins hold all the mass), evaluated as
    −expm1(log p_top) − Σ_{k ≠ top} p_k, which keeps float32 precision when one bin holds
    nearly all the mass (a peaked teacher, where 1 − exp(lse) would cancel catastrophically).
    The top bin is picked by argmax, not jnp.max: with tied bins jnp.max splits its gradient
    among them while `rest` excludes only the argmax, which made ∂/∂bins wrong."""
    top_at = jnp.argmax(bins_logp, axis=-1)
    top = jnp.take_along_axis(bins_logp, top_at[..., None], axis=-1)[..., 0]
    not_top = 1.0 - jax.nn.one_hot(top_at, bins_logp.shape[-1], dtype=bins_logp.dtype)
    rest = jnp.sum(jnp.exp(bins_logp) * not_top, axis=-1)
    return -jnp.expm1(top) - rest


def _tail_floor(dtype: Any) -> Array:
    """1 − exp(−1e−7): the tail mass at the spec's cap min(lse, −1e−7)."""
    return -jnp.expm1(jnp.asarray(TOPK_TAIL_MAX_LOGSUMEXP, dtype))


def _log_tail(bins_logp: Array) -> Array:
    """log of the probability mass outside the K bins: log(1 − exp(min(lse(bins), −1e−7))),
    i.e. log(max(`_tail_mass`, 1 − exp(−1e−7)))."""
    return jnp.log(jnp.maximum(_tail_mass(bins_logp), _tail_floor(bins_logp.dtype)))


def _tail_log_ratio(student: Array, teacher: Array, mass_s: Array, mass_t: Array,
                    floor: Array) -> Array:
    """log p_t,tail − log p_s,tail, `[...]`, from the bins' log-probs `[..., K]`.

    mass_t − mass_s = Σ_k (p_s,k − p_t,k), each term −p_s,k·expm1(y_k) for a small
    y_k = log p_t,k − log p_s,k: float32 forms it without the ~1e−7 absolute rounding of each
    tail mass, which (divided by a small tail) swamped a y ~ 1e−4. Where the tails are unfloored
    and within a factor 1.5 of each other the ratio is log1p((mass_t − mass_s) / mass_s);
    elsewhere the plain difference of the (floored) logs, the spec's formula."""
    tail_s, tail_t = jnp.maximum(mass_s, floor), jnp.maximum(mass_t, floor)
    plain = jnp.log(tail_t) - jnp.log(tail_s)
    y = teacher - student
    small = jnp.abs(y) < EXP_SERIES_MAX
    per_bin = jnp.where(small, -jnp.exp(student) * jnp.expm1(jnp.where(small, y, 0.0)),
                        jnp.exp(student) - jnp.exp(teacher))
    diff = jnp.sum(per_bin, axis=-1)
    close = (mass_s > floor) & (mass_t > floor) & (jnp.abs(diff) <= 0.5 * tail_s)
    precise = jnp.log1p(jnp.where(close, diff / tail_s, 0.0))
    return jnp.where(close, precise, plain)


def topk_reverse_kl(student_topk_logp: Array, teacher_topk_logp: Array) -> Array:
    """Reverse KL(student ‖ teacher) over the teacher's top-K ids plus one tail bin (SPEC §5).

    Inputs `[..., K]`: log-probs of student and teacher at the teacher's top-K token ids (one
    floating dtype; `clawjax.losses.topk_reverse_kl` checks the shapes and upcasts to at least
    float32). Returns `[...]`: Σ_{k=1..K+1} p_s,k (log p_s,k − log p_t,k), the tail bin holding
    the mass outside the K ids for each of the two distributions.

    Evaluated without cancellation: with y_k = log p_t,k − log p_s,k, P = Σ p_s and Q = Σ p_t
    over the K+1 bins, Σ p_s (log p_s − log p_t) = Σ p_s φ(y) − (Q − P) with φ(y) = e^y − 1 − y
    ≥ 0 (an identity in the student's inputs, so values and gradients are the formula's): a
    series where |y| < 0.5, else p_t − p_s·(1 + y) with p_t from the teacher directly (no e^y
    overflow). P = Q = 1 unless a tail is floored, where Q − P is formed from the two floor
    excesses. The direct sum has terms of both signs down to a KL ~ spread²: for nearly equal
    distributions (self-distillation) float32 gave negative values and noise there. A student
    bin with p_s = 0 (log-prob −inf, or underflowing) adds 0 (0·log 0 = 0) with a zero gradient.
    """
    s, t = student_topk_logp, teacher_topk_logp
    floor = _tail_floor(jnp.promote_types(s.dtype, t.dtype))
    mass_s, mass_t = _tail_mass(s), _tail_mass(t)
    y_tail = _tail_log_ratio(s, t, mass_s, mass_t, floor)
    p = jnp.exp(jnp.concatenate([s, jnp.log(jnp.maximum(mass_s, floor))[..., None]], axis=-1))
    q = jnp.concatenate([jnp.exp(t), jnp.maximum(mass_t, floor)[..., None]], axis=-1)
    y = jnp.concatenate([t - s, y_tail[..., None]], axis=-1)
    seen = p > 0                 # y is ±inf or NaN where s = −inf: kept out of both branches
    small = seen & (jnp.abs(y) < EXP_SERIES_MAX)
    y = jnp.where(seen, y, 0.0)
    terms = jnp.where(small, p * exp_minus_one_minus(jnp.where(small, y, 0.0)),
                      q - p * (1.0 + y))
    excess_q = jnp.maximum(floor - mass_t, 0.0)     # Q − 1
    excess_p = jnp.maximum(floor - mass_s, 0.0)     # P − 1
    return jnp.sum(terms, axis=-1) - excess_q + excess_p
