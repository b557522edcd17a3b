"""clawjax.losses / clawjax.logprobs as another JAX project calls them: half-precision inputs,
ratios exactly on a clip bound, zero-probability student bins, mismatched shapes, float token
ids, NumPy / JAX scalars in the config. Numbers against the float64 NumPy reference
(np_reference) evaluated on the same (rounded) inputs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_reference as ref
from clawjax import losses
from clawjax.batch import pack
from clawjax.sample import Sample

RTOL = 1e-6      # float32 results against float64 on the same inputs: a few float32 ulps


def _ppo_value_and_grad(logp, old, adv, **kw):
    def f(x):
        return jnp.sum(losses.ppo_policy_loss(x, old, adv, **kw)[0])
    return losses.ppo_policy_loss(logp, old, adv, **kw)[0], jax.grad(f)(logp)


# ---------------------------------------------------------------- 1. half precision
def test_float16_ppo_and_kl_are_computed_in_float32_and_stay_finite():
    """e^20 > float16's max (65504): the log-ratio cap did nothing in float16 and a log-ratio of
    12 gave NaN values and gradients (A = 0: inf·0) where SPEC gives [0, −1.28, 3] and 0."""
    logp = jnp.asarray([-1.0, -1.0, -1.0, -1.0], jnp.float16)
    old = jnp.asarray([-13.0, -13.0, -13.0, -1.125], jnp.float16)
    adv = jnp.asarray([0.0, 1.0, -1.0, 0.5], jnp.float16)
    loss, grad = _ppo_value_and_grad(logp, old, adv, dual_clip=3.0)
    assert loss.dtype == jnp.float32
    want, _ = ref.ppo(logp, old, adv, dual_clip=3.0)
    np.testing.assert_allclose(np.asarray(loss, np.float64), want, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(grad, np.float64),
                               ref.ppo_grad(logp, old, adv, dual_clip=3.0), rtol=2e-3)  # f16 grad
    x, r = jnp.asarray([-15.0, -3.0], jnp.float16), jnp.asarray([-1.0, -1.5], jnp.float16)
    kl = losses.kl_penalty(x, r, "low_var_kl")
    kl_grad = jax.grad(lambda v: jnp.sum(losses.kl_penalty(v, r, "low_var_kl")))(x)
    assert kl.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(kl, np.float64), ref.kl(x, r, "low_var_kl"), rtol=RTOL)
    np.testing.assert_allclose(np.asarray(kl_grad, np.float64),
                               ref.kl_grad(x, r, "low_var_kl"), rtol=2e-3)


def test_bfloat16_inputs_use_exact_clip_bounds_and_return_float32():
    """In bfloat16 the bounds became 0.80078 / 1.28125 and the loss came back in bfloat16."""
    logp = jnp.asarray([-1.0, -1.0, -0.5], jnp.bfloat16)
    old = jnp.asarray([-1.5, -0.5, -0.5], jnp.bfloat16)          # ratio e^0.5, e^−0.5, 1
    adv = jnp.asarray([1.0, -1.0, 2.0], jnp.bfloat16)
    loss, clipped = losses.ppo_policy_loss(logp, old, adv)
    want, want_clipped = ref.ppo(logp, old, adv)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(loss, np.float64), want, rtol=RTOL)
    np.testing.assert_array_equal(clipped, want_clipped)
    s = jnp.log(jnp.asarray([[0.5, 0.25, 0.125]], jnp.bfloat16))
    t = jnp.log(jnp.asarray([[0.375, 0.25, 0.25]], jnp.bfloat16))
    got = losses.topk_reverse_kl(s, t)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), ref.topk_reverse_kl(s, t), rtol=1e-5)


@pytest.mark.parametrize("reward", [0.0, 1.0])
def test_combined_loss_of_a_float16_batch_matches_float64(reward):
    """A TokenBatch cast to float16 (a T4 user): a log-ratio of 12 gave a NaN gradient."""
    smp = Sample(sample_id="a", tokens=[1, 2, 3, 4], response_len=2, rollout_logp=[-13.0, -0.5],
                 reward=reward).validate()
    batch = pack([smp], token_budget=4, row_buckets=(1,))[0]
    half = jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, jnp.float16) if np.asarray(x).dtype.kind == "f" else x, batch)
    logp = jnp.asarray([[0.0, 0.0, -1.0, -0.5]], jnp.float16)
    cfg = losses.LossConfig()
    loss, grad = jax.value_and_grad(lambda x: losses.combined_loss(x, half, cfg)[0])(logp)
    assert loss.dtype == jnp.float32
    response = np.asarray([-1.0, -0.5])
    want = ref.divide(ref.sample_loss([smp], {"a": response}, dataclasses.asdict(cfg)))["loss"]
    assert float(loss) == pytest.approx(want, rel=RTOL)
    want_grad = ref.ppo_grad(response, smp.rollout_logp, reward) / 2     # mean of 2 tokens
    np.testing.assert_allclose(np.asarray(grad, np.float64)[0, 2:], want_grad, rtol=1e-3)
    assert np.all(np.asarray(grad)[0, :2] == 0.0)


# ---------------------------------------------------------------- 2. clip-bound gradient
@pytest.mark.parametrize("ratio,adv,eps,eps_high,x64", [
    (1.0, -1.0, 0.2, 0.0, False),      # on-policy, ε_high = 0 (LossConfig accepts it)
    (1.0, 1.0, 0.0, 0.28, False),      # on-policy, ε = 0
    (0.8, 1.0, 0.2, 0.28, True),       # ratio = 1 − ε, A > 0 (x64: exactly on the bound)
    (1.28, -1.0, 0.2, 0.28, True)])    # ratio = 1 + ε_high, A < 0
def test_ppo_gradient_on_a_smooth_clip_bound_is_the_whole_derivative(ratio, adv, eps, eps_high,
                                                                      x64):
    """jnp.clip and jnp.maximum split a tie's gradient: 0.75× the true −ratio·A there."""
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        logp, old = jnp.asarray([np.log(ratio)], dtype), jnp.zeros(1, dtype)
        a = jnp.asarray([adv], dtype)
        assert float(jnp.exp(logp - old)[0]) in (1.0 - eps, 1.0 + eps_high)   # on the bound
        loss, grad = _ppo_value_and_grad(logp, old, a, eps_clip=eps, eps_clip_high=eps_high)
        want, _ = ref.ppo(logp, old, a, eps, eps_high)
        np.testing.assert_allclose(np.asarray(loss), want, rtol=RTOL)
        np.testing.assert_allclose(np.asarray(grad), ref.ppo_grad(logp, old, a, eps, eps_high),
                                   rtol=RTOL)


def test_combined_loss_gradient_on_policy_with_eps_clip_high_zero():
    smp = Sample(sample_id="a", tokens=[1, 2, 3], response_len=2, rollout_logp=[-0.5, -0.7],
                 reward=-1.0)
    batch = pack([smp], token_budget=3, row_buckets=(1,))[0]
    cfg = losses.LossConfig(eps_clip_high=0.0)
    logp = jnp.asarray(batch.old_logp)
    grad = jax.jit(jax.grad(lambda x: losses.combined_loss(x, batch, cfg)[0]))(logp)
    want = ref.ppo_grad(smp.rollout_logp, smp.rollout_logp, -1.0, 0.2, 0.0) / 2
    np.testing.assert_allclose(np.asarray(grad)[0, 1:], want, rtol=RTOL)       # 0.5, not 0.375


# ---------------------------------------------------------------- 3. zero-probability bins
@pytest.mark.parametrize("s3", [-np.inf, -1e30, -1e8, -1e6, -9999.0, -120.0, -50.0])
def test_topk_reverse_kl_with_a_zero_probability_student_bin_matches_float64(s3):
    """y = t − s, then e^(s + y): NaN for s = −inf, and ~e^0 = 1 instead of p_t for s ≲ −1e8
    (float32 loses t in s + y). A bin with p_s = 0 adds 0 to the KL, with a zero gradient."""
    student = np.log(np.asarray([[0.6, 0.3, 0.05], [0.2, 0.2, 0.2]], np.float32))
    teacher = np.log(np.asarray([[0.5, 0.2, 0.1], [0.1, 0.3, 0.05]], np.float32))
    student[:, 2] = s3
    got = losses.topk_reverse_kl(student, teacher)
    grad = jax.grad(lambda x: jnp.sum(losses.topk_reverse_kl(x, teacher)))(jnp.asarray(student))
    np.testing.assert_allclose(np.asarray(got, np.float64), ref.topk_reverse_kl(student, teacher),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad, np.float64),
                               ref.topk_reverse_kl_grad(student, teacher), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- 4. shapes
def _batch():
    smp = Sample(sample_id="a", tokens=[1, 2, 3, 4, 5], response_len=3,
                 rollout_logp=[-1.0, -1.0, -1.0], reward=1.0)
    return pack([smp, dataclasses.replace(smp, sample_id="b")], token_budget=5,
                row_buckets=(2,))[0]


def _shape_cases():
    z = jnp.zeros
    b = _batch()
    cfg = losses.LossConfig()
    return {
        "advantages (4,) (4, 4)": lambda: losses.ppo_policy_loss(z((4, 4)), z((4, 4)), z(4)),
        "old_logp (2, 5) (2, 6)": lambda: losses.ppo_policy_loss(z((2, 6)), z((2, 5)), z((2, 6))),
        "ref_logp (2, 5) (2, 6)": lambda: losses.kl_penalty(z((2, 6)), z((2, 5))),
        "teacher_topk_logp (2, 5) (2, 4)": lambda: losses.topk_reverse_kl(z((2, 4)), z((2, 5))),
        "rewards (2, 2) (2,)": lambda: losses.grpo_advantages(z((2, 2)), z((2, 2), jnp.int32)),
        "group_ids (3,) (4,)": lambda: losses.grpo_advantages(z(4), z(3, jnp.int32)),
        "segment_ids (2, 4) (2, 5)": lambda: losses.reduce(z((2, 5)), z((2, 5)), z((2, 4)),
                                                          "sample_mean"),
        "batch.rewards (2,) (2, 5)": lambda: losses.combined_loss(
            b.old_logp, dataclasses.replace(b, rewards=np.ones(2, np.float32)), cfg),
        "batch.old_logp (2, 4) (2, 5)": lambda: losses.combined_loss(
            b.old_logp, dataclasses.replace(b, old_logp=b.old_logp[:, :-1]), cfg),
        "batch.rewards (5,) (5, 5)": lambda: losses.combined_advantages(dataclasses.replace(
            b, rewards=np.ones(5), old_logp=np.zeros((5, 5)), teacher_logp=np.zeros((5, 5)),
            teacher_mask=np.zeros((5, 5)))),
    }


@pytest.mark.parametrize("case", list(_shape_cases()))
def test_mismatched_shapes_are_refused_naming_the_field_and_both_shapes(case):
    """advantages [R] beside logp [R, L] with R == L was broadcast per column (the wrong sample's
    reward); grpo_advantages of [2, 2] rewards returned [2, 2, 2]; the rest got JAX's generic
    broadcasting error naming no field."""
    field, found, expected = case.split(" ", 1)[0], *case.split(" ", 1)[1].split(") ")
    with pytest.raises(ValueError) as info:
        _shape_cases()[case]()
    text = str(info.value)
    assert f"{field} has shape {found})" in text and f"expected {expected}" in text, text


def test_shape_checks_run_at_trace_time_and_valid_shapes_still_vmap():
    f = jax.jit(losses.ppo_policy_loss)
    with pytest.raises(ValueError, match=r"advantages has shape \(4,\), expected \(4, 4\)"):
        f(jnp.zeros((4, 4)), jnp.zeros((4, 4)), jnp.ones(4))
    logp = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 5)) * 0.3, jnp.float32)
    adv = jnp.ones((3, 4, 5))
    got = jax.vmap(lambda x, a: losses.ppo_policy_loss(x, jnp.zeros_like(x), a)[0])(logp, adv)
    np.testing.assert_allclose(np.asarray(got, np.float64),
                               ref.ppo(logp, np.zeros(logp.shape), adv)[0], rtol=RTOL)


# ---------------------------------------------------------------- 5. segment-id invariant
def test_segment_id_invariant_is_documented_where_it_applies():
    """Ids above L are merged into the next row's samples or dropped by sample_mean; that cannot
    be checked under jit, so the reduction and the loss must state the invariant."""
    for fn in (losses.reduce, losses.combined_loss_terms, losses.combined_loss):
        doc = " ".join(fn.__doc__.split())
        assert "1..n per row" in doc and "never above L" in doc, fn.__name__
    assert "merged into a sample of the next row or dropped" in " ".join(
        losses.reduce.__doc__.split())


def test_sample_mean_with_ids_up_to_the_row_length_matches_float64():
    """The edge of the contract: one-token samples, so ids reach L in every row."""
    rng = np.random.default_rng(5)
    values = rng.normal(size=(3, 6)).astype(np.float32)
    seg = np.tile(np.arange(1, 7, dtype=np.int32), (3, 1))
    mask = (rng.random((3, 6)) < 0.7).astype(np.float32)
    got = jax.jit(losses.reduce, static_argnums=3)(values, mask, seg, "sample_mean")
    np.testing.assert_allclose(np.asarray(got, np.float64),
                               ref.reduce_rows(values, mask, seg, "sample_mean"), rtol=1e-5)


# ---------------------------------------------------------------- 6. token id dtypes
def test_float_token_ids_are_refused_naming_the_field():
    """Float targets were cast to int32: 1.7 silently became id 1."""
    rng = np.random.default_rng(6)
    h = rng.normal(size=(2, 5, 8)).astype(np.float32)
    w = rng.normal(size=(8, 10)).astype(np.float32)
    ids, seg = rng.integers(0, 10, (2, 5)), np.ones((2, 5), np.int32)
    cases = {"targets": lambda: losses.token_logp_and_entropy(h, w, ids + 0.7, chunk=4),
             "tokens": lambda: losses.sequence_logp_and_entropy(h, w, ids * 1.0, seg, chunk=4),
             "topk_ids": lambda: losses.sequence_logp_entropy_topk(
                 h, w, ids, seg, np.zeros((2, 5, 2), np.float32), chunk=4)}
    for field, call in cases.items():
        with pytest.raises(ValueError, match=rf"{field} has dtype float\d+, expected an integer"):
            call()
    with pytest.raises(ValueError, match="targets has dtype"):
        jax.jit(losses.token_logp_and_entropy)(h, w, jnp.asarray(ids, jnp.float32))
    for dtype in (np.int64, np.uint8):          # any integer dtype is fine
        logp, _ = losses.token_logp_and_entropy(h, w, ids.astype(dtype), chunk=4)
        np.testing.assert_allclose(logp, ref.token_logp_entropy(h, w, ids)[0], rtol=1e-5,
                                   atol=1e-5)
    doc = " ".join(losses.token_logp_and_entropy.__doc__.split())
    assert "[0, V)" in doc and "not checked" in doc


# ---------------------------------------------------------------- 7. NumPy / JAX scalars
@pytest.mark.parametrize("field,value", [
    ("w_rl", np.float32(0.5)), ("kl_coef", jnp.float32(0.02)), ("dual_clip", np.int64(3)),
    ("eps_clip", np.float16(0.2)), ("tis_cap", np.array(1.5)), ("use_tis", np.bool_(True))])
def test_loss_config_accepts_numpy_and_jax_scalars(field, value):
    """`np.float32(0.5)` was refused as "expected a number"."""
    cfg = losses.LossConfig(**{field: value})
    plain = bool(value) if field == "use_tis" else float(value)
    stored = getattr(cfg, field)
    assert type(stored) is type(plain) and stored == plain
    assert cfg == losses.LossConfig(**{field: plain})
    assert hash(cfg) == hash(losses.LossConfig(**{field: plain}))


@pytest.mark.parametrize("field,value", [
    ("w_rl", np.bool_(True)), ("kl_coef", True), ("eps_clip", "0.2"), ("tis_cap", np.ones(2)),
    ("use_tis", np.int64(1))])
def test_loss_config_still_refuses_bools_and_non_numbers(field, value):
    with pytest.raises(ValueError, match=rf"LossConfig\.{field} = "):
        losses.LossConfig(**{field: value})


def test_logp_chunk_accepts_a_numpy_integer():
    rng = np.random.default_rng(7)
    h, w = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(8, 10)).astype(np.float32)
    t = rng.integers(0, 10, 6)
    got = losses.token_logp_and_entropy(h, w, t, chunk=np.int64(4))
    want = ref.token_logp_entropy(h, w, t)
    for g, x in zip(got, want):
        np.testing.assert_allclose(g, x, rtol=1e-5, atol=1e-5)
    for bad in (True, np.float32(4.0), 0):
        with pytest.raises(ValueError, match="chunk"):
            losses.token_logp_and_entropy(h, w, t, chunk=bad)
