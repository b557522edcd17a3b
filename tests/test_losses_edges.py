"""clawjax.losses and clawjax.sample at the edges the main tests leave out: nearly equal
policies (a KL or a top-K reverse KL near 0, where float32 cancellation can swamp the value),
and the data contract's error messages. Numbers are checked against the float64 NumPy
reference (np_reference) evaluated on the same float32 inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_reference as ref
from clawjax import losses
from clawjax.sample import Sample, SampleError

# Relative tolerance against float64 on the same float32 inputs: a few float32 ulps of headroom.
REL = 1e-4


def _log_softmax(z: np.ndarray) -> np.ndarray:
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ---------------------------------------------------------------- KL near 0 (SPEC §3)
@pytest.mark.parametrize("spread", [1e-5, 1e-4, 1e-3, 1e-2, 0.3, 3.0])
def test_low_var_kl_of_nearby_policies_matches_float64_and_is_never_negative(spread):
    """k3 = e^x − 1 − x with x = ref − logp ~ 1e-4 is ~5e-9; float32 e^x − 1 − x rounds e^x to
    ~6e-8 and gave negative KLs and a mean KL off by ×150 (spread 1e-5), gradients off by 100%.
    Every value and gradient must match float64 to REL (relative) and k3 is never < 0."""
    rng = np.random.default_rng(int(spread * 1e6))
    logp = (-rng.exponential(1.0, 2000)).astype(np.float32)
    ref_logp = np.minimum(logp + rng.normal(0.0, spread, logp.shape), 0.0).astype(np.float32)
    got = np.asarray(losses.kl_penalty(logp, ref_logp, "low_var_kl"), np.float64)
    want = ref.kl(logp, ref_logp, "low_var_kl")
    assert np.all(got >= 0.0)
    np.testing.assert_allclose(got, want, rtol=REL, atol=1e-30)
    grad = jax.grad(lambda lp: jnp.sum(losses.kl_penalty(lp, ref_logp, "low_var_kl")))(logp)
    np.testing.assert_allclose(np.asarray(grad, np.float64),
                               ref.kl_grad(logp, ref_logp, "low_var_kl"), rtol=REL, atol=1e-30)


def test_low_var_kl_keeps_its_clamp_and_finite_gradients_at_extremes():
    logp = np.asarray([-0.1, -60.0, -1.0, -1.0], np.float32)
    ref_logp = np.asarray([-60.0, -0.1, -1.0, -3.0], np.float32)
    got = losses.kl_penalty(logp, ref_logp, "low_var_kl")
    grad = jax.grad(lambda lp: jnp.sum(losses.kl_penalty(lp, ref_logp, "low_var_kl")))(logp)
    np.testing.assert_allclose(got, ref.kl(logp, ref_logp, "low_var_kl"), rtol=REL)
    np.testing.assert_allclose(grad, ref.kl_grad(logp, ref_logp, "low_var_kl"), rtol=REL)
    assert float(got[1]) == 10.0 and float(got[2]) == 0.0


# ---------------------------------------------------------------- top-K reverse KL (SPEC §5)
def _nearby_topk(rng, spread, k=8, vocab=40, rows=300, sharp=2.0):
    """Teacher and student top-K log-probs (the teacher's top K ids) of two full-vocabulary
    distributions whose logits differ by ~spread (self-distillation: the same model ± a hint)."""
    x = rng.normal(size=(rows, vocab)) * sharp
    y = x + rng.normal(0.0, spread, x.shape)
    order = np.argsort(-x, axis=-1)[:, :k]
    t = np.take_along_axis(_log_softmax(x), order, -1).astype(np.float32)
    s = np.take_along_axis(_log_softmax(y), order, -1).astype(np.float32)
    return s, t


@pytest.mark.parametrize("spread", [1e-4, 1e-3, 1e-2, 0.1, 1.0])
def test_topk_reverse_kl_of_nearby_distributions_matches_float64_and_is_never_negative(spread):
    """Σ p_s (log p_s − log p_t) sums terms of both signs down to ~spread²: in float32 the
    value was noise below spread 1e-2 (84 of 300 negative, mean ×9 too large at 1e-4).
    Values and gradients must match float64 to REL (relative) and the KL is never < 0."""
    s, t = _nearby_topk(np.random.default_rng(int(spread * 1e5)), spread)
    got = np.asarray(losses.topk_reverse_kl(s, t), np.float64)
    want = ref.topk_reverse_kl(s, t)
    assert np.all(got >= 0.0)
    np.testing.assert_allclose(got, want, rtol=REL, atol=1e-30)
    grad = jax.grad(lambda x: jnp.sum(losses.topk_reverse_kl(x, t)))(s)
    want_grad = ref.topk_reverse_kl_grad(s, t)
    scale = np.abs(want_grad).max(-1, keepdims=True)   # per position: its largest component
    assert np.all(np.abs(np.asarray(grad, np.float64) - want_grad) <= REL * scale)


@pytest.mark.parametrize("top_mass", [0.5, 0.99, 0.99999])
def test_topk_reverse_kl_with_bins_holding_all_the_mass_matches_float64(top_mass):
    """The floored tail (bins summing to ≥ 1 − 1e−7, teacher, student or both) keeps the
    formula's value and gradient: the tail bin is then a constant."""
    s = np.log(np.asarray([[top_mass, 1.0 - top_mass], [1.0 - 1e-8, 1e-8], [0.6, 0.4]]))
    t = np.log(np.asarray([[1.0 - 1e-9, 1e-9], [top_mass, 1.0 - top_mass],
                           [top_mass * 0.5, 0.1]]))
    for a, b in ((s, t), (t, s)):
        a32, b32 = a.astype(np.float32), b.astype(np.float32)
        got = losses.topk_reverse_kl(a32, b32)
        np.testing.assert_allclose(np.asarray(got, np.float64), ref.topk_reverse_kl(a32, b32),
                                   rtol=REL, atol=1e-6)
        grad = jax.grad(lambda x: jnp.sum(losses.topk_reverse_kl(x, b32)))(a32)
        np.testing.assert_allclose(np.asarray(grad, np.float64),
                                   ref.topk_reverse_kl_grad(a32, b32), rtol=REL, atol=1e-6)


# ---------------------------------------------------------------- Sample error messages
def _base(**kw):
    fields = dict(sample_id="s1", tokens=[3, 4, 5, 6], response_len=2, kind="rl")
    fields.update(kw)
    return Sample(**fields)


@pytest.mark.parametrize("bad,shown", [(0.25, "0.25"), (float("nan"), "nan"),
                                       (float("-inf"), "-inf")])
def test_a_bad_top_k_log_prob_is_named_with_its_value(bad, shown):
    """The message named no value ("'non-finite or positive entry'"): it must show the bad
    entry, as every other field's message does."""
    topk = np.asarray([[-0.1, -2.0], [-0.3, bad]])
    with pytest.raises(SampleError) as info:
        _base(teacher_topk_logp=topk, teacher_topk_ids=[[1, 2], [3, 4]]).validate()
    err = info.value
    assert err.field == "teacher_topk_logp"
    assert shown in str(err) and "finite log-probs ≤ 0" in str(err)


def test_a_non_finite_step_reward_is_named_with_its_value():
    """The message showed the first 8 step rewards, all fine, not the NaN at index 9."""
    steps = [0.5] * 9 + [float("nan")]
    with pytest.raises(SampleError) as info:
        _base(step_rewards=steps).validate()
    assert info.value.field == "step_rewards"
    assert "nan" in str(info.value) and "finite" in str(info.value)


def test_topk_reverse_kl_gradient_is_right_when_student_bins_tie():
    """Tied top bins (common when log-probs come from bfloat16 logits): the tail's gradient
    went half to each tied bin through jnp.max while only one was excluded from the rest of
    the sum, so ∂/∂s was off by ±p·(d_tail + 1)/2 on the tied bins."""
    student = np.log(np.asarray([[0.3, 0.3, 0.1], [0.2, 0.2, 0.2]], np.float32))
    teacher = np.log(np.asarray([[0.5, 0.2, 0.1], [0.1, 0.3, 0.05]], np.float32))
    got = losses.topk_reverse_kl(student, teacher)
    np.testing.assert_allclose(np.asarray(got, np.float64),
                               ref.topk_reverse_kl(student, teacher), rtol=REL)
    grad = jax.grad(lambda x: jnp.sum(losses.topk_reverse_kl(x, teacher)))(student)
    np.testing.assert_allclose(np.asarray(grad, np.float64),
                               ref.topk_reverse_kl_grad(student, teacher), rtol=REL, atol=1e-7)


@pytest.mark.parametrize("reward", [1e39, -3.5e38])
def test_a_reward_that_float32_cannot_hold_is_refused_naming_the_field(reward):
    """The batch holds rewards in float32: 1e39 passed `validate` (finite as a Python float)
    and packed as inf, turning the whole loss into inf/NaN."""
    with pytest.raises(SampleError) as info:
        _base(reward=reward).validate()
    assert info.value.field == "reward" and info.value.value == reward
    assert "float32" in info.value.expected
    ok = _base(reward=3.0e38).validate()          # within float32 range: kept
    assert np.isfinite(np.float32(ok.reward))
