"""clawjax.losses in float32 at the edges: nearby or equal GRPO rewards, extreme PPO
log-ratios; every value against the NumPy float64 reference (np_reference)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import np_reference as ref
from clawjax import losses
from clawjax.batch import pack
from clawjax.sample import Sample

RTOL, ATOL = 1e-5, 1e-6
FAST = settings(max_examples=30, deadline=None)


# ---------------------------------------------------------------- GRPO (SPEC §2)
@pytest.mark.parametrize("value", [-2.9, 0.6, 1.3, 3.0, -0.1, 100.7])
@pytest.mark.parametrize("n", [2, 3, 6, 16])
def test_grpo_advantages_of_a_group_of_equal_rewards_are_exactly_zero(value, n):
    """All members equal ⇒ r − mean = 0 and std = 0 exactly (float64 reference: 0), also next
    to another group; E[r²] − E[r]² in float32 gave e.g. 0.238 for [-2.9] * 3."""
    rewards = np.asarray([value] * n + [1.0, -1.0], np.float32)
    group_ids = jnp.asarray([7] * n + [3, 3])
    for scale in (True, False):
        got = np.asarray(losses.grpo_advantages(rewards, group_ids, scale_by_std=scale))
        want = ref.grpo(rewards, np.asarray(group_ids), scale)
        np.testing.assert_array_equal(got[:n], 0.0)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@FAST
@given(seed=st.integers(0, 2**31), n=st.integers(2, 16), groups=st.integers(1, 3),
       offset=st.sampled_from([0.0, 1.0, -3.0, 100.0, 1e4]),
       spread=st.sampled_from([1e-6, 1e-5, 1e-3]), scale=st.booleans())
def test_grpo_advantages_keep_float32_precision_for_nearby_rewards(seed, n, groups, offset,
                                                                  spread, scale):
    """Rewards close together relative to their size ([3.0, 3.0001] → ±0.697, not ±50): the
    float32 result matches the float64 reference on the same (float32) rewards to 1e-5 of the
    largest advantage."""
    rng = np.random.default_rng(seed)
    rewards = (offset + rng.normal(0.0, spread * max(1.0, abs(offset)), n)).astype(np.float32)
    group_ids = rng.integers(0, groups, n)
    got = np.asarray(losses.grpo_advantages(rewards, jnp.asarray(group_ids), scale_by_std=scale))
    want = ref.grpo(rewards, group_ids, scale)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * max(np.abs(want).max(), 1e-30))


def test_grpo_advantages_of_two_nearby_rewards():
    rewards = np.asarray([3.0, 3.0001], np.float32)
    got = np.asarray(losses.grpo_advantages(rewards, jnp.zeros(2, jnp.int32)))
    np.testing.assert_allclose(got, ref.grpo(rewards, [0, 0]), rtol=RTOL)
    np.testing.assert_allclose(got, [-0.69724, 0.69724], rtol=1e-4)


# ---------------------------------------------------------------- PPO clip (SPEC §1)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_ppo_policy_loss_stays_finite_for_an_extreme_log_ratio(dual_clip):
    """logp − old_logp = 94.5 > ~88.7 overflowed exp in float32: NaN loss for A = 0 (inf·0) and
    NaN/inf gradients. The capped log-ratio gives the float64 reference's value wherever the
    clip acts (A > 0, A = 0, A < 0 with dual clip) and e^20·|A| for the unbounded branch."""
    logp = jnp.full((4,), -0.5, jnp.float32)
    old = jnp.full((4,), -95.0, jnp.float32)
    adv = jnp.asarray([1.0, 0.0, -1.0, 2.5], jnp.float32)
    loss, clipped = losses.ppo_policy_loss(logp, old, adv, dual_clip=dual_clip)
    grad = jax.grad(lambda lp: jnp.sum(losses.ppo_policy_loss(lp, old, adv,
                                                              dual_clip=dual_clip)[0]))(logp)
    want, want_clipped = ref.ppo(logp, old, adv, dual_clip=dual_clip)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad, 0.0)           # clipped, or capped: no gradient
    np.testing.assert_array_equal(clipped, want_clipped)
    bounded = np.asarray(adv) >= 0 if dual_clip is None else np.ones(4, bool)
    np.testing.assert_allclose(np.asarray(loss)[bounded], want[bounded], rtol=RTOL, atol=ATOL)
    if dual_clip is None:   # A < 0, no dual clip: l = −ratio·A, capped at e^20·|A|
        np.testing.assert_allclose(loss[2], np.exp(losses.PPO_MAX_LOG_RATIO), rtol=RTOL)


def test_combined_loss_of_a_valid_sample_with_an_extreme_log_ratio_is_finite():
    """A sample passing `validate` (rollout_logp −95 on one token) made the whole loss NaN
    (reward 0) or its gradient NaN (reward 1); now both match the float64 reference."""
    cfg = losses.LossConfig()
    b = Sample(sample_id="b", tokens=[5, 6, 7, 8, 9], response_len=3,
               rollout_logp=[-1.0, -2.0, -0.5], reward=1.0)
    for reward in (0.0, 1.0):
        a = Sample(sample_id="a", tokens=[5, 6, 7, 8], response_len=2,
                   rollout_logp=[-95.0, -1.0], reward=reward).validate()
        batch = pack([a, b], token_budget=16)[0]
        logp = jnp.where(batch.loss_mask > 0, -0.5, 0.0).astype(jnp.float32)
        loss, grad = jax.value_and_grad(lambda lp: losses.combined_loss(lp, batch, cfg)[0])(logp)
        current = {s.sample_id: np.full(s.response_len, -0.5) for s in (a, b)}
        want = ref.divide(ref.sample_loss([a, b], current, dataclasses.asdict(cfg)))["loss"]
        assert np.isfinite(want)
        assert float(loss) == pytest.approx(want, rel=RTOL), reward
        assert np.all(np.isfinite(np.asarray(grad))), reward
