"""clawjax.losses against the independent float64 NumPy reference (tests/np_reference.py)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import np_reference as ref
from clawjax import losses
from clawjax.batch import TokenBatch

RTOL, ATOL = 1e-5, 1e-6
FAST = settings(max_examples=30, deadline=None)


# ---------------------------------------------------------------- random packed batches
def random_batch(rng: np.random.Generator, rows: int, length: int, *, topk: int = 0,
                 with_ref: bool = False, dtype=np.float32) -> tuple[TokenBatch, dict]:
    """A packed batch with a random segment layout (segment lengths ≥ 2, prompt ≥ 1, random
    loss masks, teacher presence, rewards in {−1, 0, 1}), and the current-policy arrays
    (logp, entropy, student top-K) a model would give. Padding and prompt positions hold
    random garbage on purpose: they must not matter."""
    shape = (rows, length)
    seg = np.zeros(shape, np.int32)
    loss_mask = np.zeros(shape, np.float32)
    teacher_mask = np.zeros(shape, np.float32)
    rewards = rng.normal(size=shape).astype(np.float32)
    for r in range(rows):
        t, k = 0, 0
        while length - t >= 2 and (k == 0 or rng.random() < 0.8):
            n = int(rng.integers(2, length - t + 1))
            p = int(rng.integers(1, n))
            k += 1
            seg[r, t:t + n] = k
            loss_mask[r, t + p:t + n] = rng.random(n - p) < 0.8
            teacher_mask[r, t + p:t + n] = rng.random() < 0.5
            rewards[r, t:t + n] = rng.choice([-1.0, 0.0, 1.0])
            t += n

    def logps(scale=1.0):
        return (-rng.exponential(scale, size=shape)).astype(dtype)

    fields = dict(
        tokens=rng.integers(0, 100, shape).astype(np.int32),
        positions=np.zeros(shape, np.int32), segment_ids=seg, loss_mask=loss_mask,
        old_logp=logps(), rollout_logp=logps(), teacher_logp=logps(),
        teacher_mask=teacher_mask, rewards=rewards.astype(dtype))
    if with_ref:
        fields["ref_logp"] = logps()
    extra = {"logp": logps(), "entropy": rng.exponential(2.0, size=shape).astype(dtype)}
    if topk:
        def topk_logps():
            x = rng.normal(size=shape + (topk + 3,))
            x = x - np.log(np.exp(x).sum(-1, keepdims=True))
            return np.sort(x[..., :topk], axis=-1)[..., ::-1].astype(dtype)
        fields["teacher_topk_logp"] = topk_logps()
        fields["teacher_topk_ids"] = rng.integers(0, 100, shape + (topk,)).astype(np.int32)
        fields["teacher_topk_mask"] = ((rng.random(shape) < 0.7) * loss_mask).astype(np.float32)
        extra["student_topk"] = topk_logps()
    return TokenBatch(**fields), extra


def reference_terms(batch: TokenBatch, extra: dict, cfg: losses.LossConfig) -> dict:
    """The reference's per-token terms, reduced over the packed rows."""
    c = dataclasses.asdict(cfg)
    terms = ref.per_token_terms(
        extra["logp"], batch.old_logp, batch.rollout_logp, batch.rewards, batch.teacher_logp,
        batch.teacher_mask, c, ref_logp=batch.ref_logp, entropy=extra.get("entropy"),
        student_topk=extra.get("student_topk"), teacher_topk=batch.teacher_topk_logp,
        topk_mask=1.0 if batch.teacher_topk_mask is None else batch.teacher_topk_mask)
    out = {k: ref.reduce_rows(v, batch.loss_mask, batch.segment_ids, c["reduction"])
           for k, v in terms.items()}
    sel = (batch.loss_mask > 0) & (batch.segment_ids > 0)
    out["num_tokens"] = (float(sel.sum()), 0.0)
    out["num_samples"] = (ref.reduce_rows(np.ones(sel.shape), batch.loss_mask,
                                          batch.segment_ids, "sample_mean")[1], 0.0)
    return out


configs = st.builds(
    losses.LossConfig,
    w_rl=st.sampled_from([1.0, 0.5]), w_opd=st.sampled_from([1.0, 2.0, 0.0]),
    eps_clip=st.sampled_from([0.2, 0.1]), eps_clip_high=st.sampled_from([0.28, 0.2]),
    dual_clip=st.sampled_from([None, 3.0, 1.5]), kl_coef=st.sampled_from([0.0, 0.02, 0.5]),
    kl_kind=st.sampled_from(losses.KL_KINDS), entropy_coef=st.sampled_from([0.0, 0.01, -0.1]),
    reduction=st.sampled_from(losses.REDUCTIONS), topk_coef=st.sampled_from([0.0, 1.0]),
    use_tis=st.booleans(), tis_cap=st.sampled_from([2.0, 1.2]))


# ---------------------------------------------------------------- config and import
def test_loss_config_is_hashable_and_a_static_jit_argument():
    a, b = losses.LossConfig(), losses.LossConfig(kl_coef=0)
    assert a == b and hash(a) == hash(b) and isinstance(b.kl_coef, float)
    assert losses.LossConfig(dual_clip=3) != a
    traces = []

    def f(x, cfg):
        traces.append(cfg)
        return x * cfg.eps_clip

    f = jax.jit(f, static_argnums=1)
    assert float(f(jnp.ones(()), a)) == pytest.approx(0.2)
    f(jnp.ones(()), b)
    assert len(traces) == 1          # equal configs hit the same cache entry
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.kl_coef = 1.0


@pytest.mark.parametrize("field,value", [
    ("eps_clip", -0.1), ("eps_clip", 1.0), ("eps_clip_high", -1.0), ("dual_clip", 1.0),
    ("dual_clip", "3"), ("kl_coef", -0.1), ("kl_kind", "k3"), ("reduction", "mean"),
    ("topk_coef", -1.0), ("tis_cap", 0.0), ("use_tis", 1), ("w_rl", float("nan")),
    ("entropy_coef", float("inf")), ("w_opd", True)])
def test_loss_config_rejects_invalid_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"LossConfig\.{field} = {repr(value)[:3]}"):
        losses.LossConfig(**{field: value})


def test_importing_losses_pulls_in_no_heavy_framework():
    code = ("import sys; from clawjax import losses; "
            "bad = [m for m in ('flax', 'grpc', 'torch', 'transformers', 'optax', 'orbax') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- per-token functions
@FAST
@given(seed=st.integers(0, 2**31), shape=st.sampled_from([(7,), (3, 5), (2, 3, 4)]),
       eps=st.sampled_from([0.2, 0.1, 0.0]), eps_high=st.sampled_from([0.28, 0.2]),
       dual_clip=st.sampled_from([None, 3.0, 1.2]))
def test_ppo_policy_loss_matches_reference(seed, shape, eps, eps_high, dual_clip):
    rng = np.random.default_rng(seed)
    logp = -rng.exponential(1.0, shape).astype(np.float32)
    old = (logp + rng.normal(0, 0.4, shape)).astype(np.float32)
    adv = rng.normal(0, 2.0, shape).astype(np.float32)
    loss, clipped = losses.ppo_policy_loss(logp, old, adv, eps, eps_high, dual_clip)
    want_loss, want_clipped = ref.ppo(logp, old, adv, eps, eps_high, dual_clip)
    assert loss.shape == clipped.shape == shape
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(clipped, want_clipped)


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    logp, old = np.log([0.9, 0.9, 0.9]), np.log([0.01, 0.01, 0.01])   # ratio 90
    adv = np.array([-1.0, 1.0, -0.5])
    loss, clipped = losses.ppo_policy_loss(logp, old, adv, dual_clip=3.0)
    np.testing.assert_allclose(loss, [3.0, -1.28, 1.5], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [0.0, 1.0, 0.0])


@FAST
@given(seed=st.integers(0, 2**31), kind=st.sampled_from(losses.KL_KINDS),
       spread=st.sampled_from([0.3, 3.0, 30.0]))
def test_kl_penalty_matches_reference(seed, kind, spread):
    rng = np.random.default_rng(seed)
    logp = -rng.exponential(spread, (4, 9)).astype(np.float32)
    ref_logp = -rng.exponential(spread, (4, 9)).astype(np.float32)
    got = losses.kl_penalty(logp, ref_logp, kind)
    np.testing.assert_allclose(got, ref.kl(logp, ref_logp, kind), rtol=RTOL, atol=1e-5)


def test_kl_penalty_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'k4'"):
        losses.kl_penalty(jnp.zeros(2), jnp.zeros(2), "k4")


@FAST
@given(seed=st.integers(0, 2**31), k=st.sampled_from([1, 3, 8]), lead=st.sampled_from([(5,), (2, 3)]),
       sharp=st.sampled_from([0.5, 2.0]))
def test_topk_reverse_kl_matches_reference(seed, k, lead, sharp):
    rng = np.random.default_rng(seed)

    def topk():
        x = rng.normal(size=lead + (k + 3,)) * sharp
        x = x - np.log(np.exp(x).sum(-1, keepdims=True))
        return x[..., :k].astype(np.float32)

    s, t = topk(), topk()
    got = losses.topk_reverse_kl(s, t)
    assert got.shape == lead
    np.testing.assert_allclose(got, ref.topk_reverse_kl(s, t), rtol=RTOL, atol=2e-6)


@pytest.mark.parametrize("top_mass", [0.9, 0.999, 0.99999])
def test_topk_reverse_kl_keeps_precision_for_peaked_distributions(top_mass):
    """Top-1 holding nearly all the mass (a confident LLM) leaves a tiny tail that a naive
    float32 1 − exp(lse) would cancel away; float32 must still match float64."""
    rest = (1 - top_mass) * np.array([0.5, 0.2, 0.1])            # tail gets the last 0.2
    teacher = np.log(np.concatenate([[top_mass], rest]))[None, :]
    student = np.log(np.concatenate([[top_mass * 0.99], rest * 1.5]))[None, :]
    want = ref.topk_reverse_kl(student, teacher)
    got = losses.topk_reverse_kl(student.astype(np.float32), teacher.astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert want[0] > 0


@FAST
@given(seed=st.integers(0, 2**31), n=st.sampled_from([1, 2, 12]), groups=st.integers(1, 4),
       scale=st.booleans())
def test_grpo_advantages_match_reference(seed, n, groups, scale):
    rng = np.random.default_rng(seed)
    rewards = rng.choice([-1.0, 0.0, 1.0, 0.5], n).astype(np.float32)
    group_ids = rng.integers(100, 100 + groups, n)
    got = losses.grpo_advantages(rewards, jnp.asarray(group_ids), scale_by_std=scale)
    np.testing.assert_allclose(got, ref.grpo(rewards, group_ids, scale), rtol=RTOL, atol=1e-4)


def test_advantages_mask_the_teacher_term_instead_of_zero_filling():
    """An RL-only token whose teacher_logp slot holds 0 (the reference's fill) gets A = r."""
    batch, _ = random_batch(np.random.default_rng(0), 2, 16)
    batch = dataclasses.replace(batch, teacher_logp=np.zeros_like(batch.teacher_logp))
    adv = losses.combined_advantages(batch, 1.0, 1.0)
    rl_only = batch.teacher_mask == 0
    np.testing.assert_array_equal(np.asarray(adv)[rl_only], batch.rewards[rl_only])
    opd = batch.teacher_mask > 0
    np.testing.assert_allclose(np.asarray(adv)[opd],
                               (batch.rewards - batch.old_logp)[opd], rtol=1e-6)


# ---------------------------------------------------------------- reductions and the loss
@FAST
@given(seed=st.integers(0, 2**31), shape=st.sampled_from([(1, 2), (1, 9), (4, 24)]),
       mode=st.sampled_from(losses.REDUCTIONS))
def test_reduce_matches_reference(seed, shape, mode):
    rng = np.random.default_rng(seed)
    batch, extra = random_batch(rng, *shape)
    got = losses.reduce(extra["logp"], batch.loss_mask, batch.segment_ids, mode)
    want = ref.reduce_rows(extra["logp"], batch.loss_mask, batch.segment_ids, mode)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, atol=ATOL)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), shape=st.sampled_from([(1, 12), (3, 20)]), cfg=configs, with_ref=st.booleans(), with_entropy=st.booleans(),
       topk=st.sampled_from([0, 3]))
def test_combined_loss_matches_reference(seed, shape, cfg, with_ref, with_entropy, topk):
    """Eager (op-by-op) so 40 random shapes × configs do not each compile; jit is covered by
    the trace-count and masking tests."""
    if cfg.kl_coef > 0 and not with_ref or cfg.entropy_coef != 0 and not with_entropy:
        cfg = dataclasses.replace(cfg, kl_coef=0.0 if not with_ref else cfg.kl_coef,
                                  entropy_coef=0.0 if not with_entropy else cfg.entropy_coef)
    rng = np.random.default_rng(seed)
    batch, extra = random_batch(rng, *shape, topk=topk, with_ref=with_ref)
    if not with_entropy:
        del extra["entropy"]
    loss, metrics = losses.combined_loss(extra["logp"], batch, cfg, extra.get("entropy"),
                       extra.get("student_topk"))
    want = ref.divide(reference_terms(batch, extra, cfg))
    assert set(metrics) == set(want)
    for key in want:
        np.testing.assert_allclose(metrics[key], want[key], rtol=RTOL, atol=ATOL, err_msg=key)
    assert float(loss) == float(metrics["loss"])


def test_combined_loss_demands_what_its_coefficients_need():
    batch, extra = random_batch(np.random.default_rng(1), 2, 8, topk=2)
    with pytest.raises(ValueError, match="kl_coef"):
        losses.combined_loss(extra["logp"], batch, losses.LossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy_coef"):
        losses.combined_loss(extra["logp"], batch, losses.LossConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="student_topk_logp"):
        losses.combined_loss(extra["logp"], batch, losses.LossConfig(topk_coef=1.0))
    with pytest.raises(ValueError, match=r"logp has shape \(2, 7\), expected \(2, 8\)"):
        losses.combined_loss(extra["logp"][:, :7], batch, losses.LossConfig())
    with pytest.raises(ValueError, match=r"student_topk_logp has shape \(2, 8, 3\), expected "
                                         r"\(2, 8, 2\)"):
        losses.combined_loss(extra["logp"], batch, losses.LossConfig(), None,
                             np.zeros((2, 8, 3), np.float32))


def test_student_topk_logp_for_a_batch_without_top_k_teacher_data_is_refused_clearly():
    """Not a misleading shape error ("expected (2, 8)"): the batch has no top-K data at all."""
    batch, extra = random_batch(np.random.default_rng(1), 2, 8)
    assert batch.teacher_topk_logp is None
    with pytest.raises(ValueError, match=r"student_topk_logp has shape \(2, 8, 3\) but the "
                                         r"batch carries no top-K teacher data") as info:
        losses.combined_loss(extra["logp"], batch, losses.LossConfig(), None,
                             np.zeros((2, 8, 3), np.float32))
    assert "expected student_topk_logp = None" in str(info.value)


def test_terms_share_one_denominator_and_divide_to_combined_loss():
    batch, extra = random_batch(np.random.default_rng(2), 3, 16, with_ref=True)
    cfg = losses.LossConfig(kl_coef=0.1, entropy_coef=0.01)
    terms = losses.combined_loss_terms(extra["logp"], batch, cfg, extra["entropy"])
    dens = {k: float(d) for k, (_, d) in terms.items() if not k.startswith("num_")}
    assert len(set(dens.values())) == 1
    assert float(terms["num_samples"][0]) == dens["loss"]
    loss, metrics = losses.combined_loss(extra["logp"], batch, cfg, extra["entropy"])
    assert float(loss) == pytest.approx(float(terms["loss"][0]) / dens["loss"], rel=1e-6)
    total = metrics["pg_loss"] + 0.1 * metrics["kl"] - 0.01 * metrics["entropy"]
    assert float(loss) == pytest.approx(float(total), rel=1e-5)


# ---------------------------------------------------------------- gradients
def test_combined_loss_gradients_match_finite_differences_in_float64():
    rng = np.random.default_rng(3)
    cfg = losses.LossConfig(kl_coef=0.3, entropy_coef=0.05, topk_coef=0.7, use_tis=True,
                            dual_clip=3.0, reduction="sample_mean")
    with jax.enable_x64(True):
        batch, extra = random_batch(rng, 2, 10, topk=3, with_ref=True, dtype=np.float64)
        # Keep ratios away from the clip kinks so the loss is smooth where we probe it.
        logp = batch.old_logp + rng.uniform(-0.05, 0.05, batch.old_logp.shape)
        args = (jnp.asarray(logp), jnp.asarray(extra["entropy"]),
                jnp.asarray(extra["student_topk"]))

        @jax.jit
        def f(lp, ent, topk):
            return losses.combined_loss(lp, batch, cfg, ent, topk)[0]

        grads = jax.grad(f, argnums=(0, 1, 2))(*args)
        assert all(g.dtype == jnp.float64 for g in grads)
        h = 1e-6
        for i, (x, g) in enumerate(zip(args, grads)):
            x = np.asarray(x)
            flat = rng.choice(x.size, size=min(x.size, 25), replace=False)
            for j in flat:
                idx = np.unravel_index(j, x.shape)
                up, down = x.copy(), x.copy()
                up[idx] += h
                down[idx] -= h
                a = list(args)
                a[i] = jnp.asarray(up)
                f_up = float(f(*a))
                a[i] = jnp.asarray(down)
                fd = (f_up - float(f(*a))) / (2 * h)
                assert float(g[idx]) == pytest.approx(fd, rel=1e-5, abs=1e-8), (i, idx)


def test_masked_tokens_get_zero_gradient_and_change_nothing():
    rng = np.random.default_rng(4)
    cfg = losses.LossConfig(kl_coef=0.2, entropy_coef=0.1, topk_coef=1.0, use_tis=True)
    batch, extra = random_batch(rng, 3, 24, topk=2, with_ref=True)
    masked = ~((batch.loss_mask > 0) & (batch.segment_ids > 0))
    assert masked.any() and (~masked).any()

    @jax.jit
    def run(batch, extra):
        def f(lp, ent, topk):
            return losses.combined_loss(lp, batch, cfg, ent, topk)[0]
        return jax.value_and_grad(f, argnums=(0, 1, 2))(
            extra["logp"], extra["entropy"], extra["student_topk"])

    loss, grads = run(batch, extra)
    for g in grads:
        g = np.asarray(g)
        assert np.all(g[masked] == 0.0)
        assert np.any(g[~masked] != 0.0)

    def scramble(x, bad):
        x = np.array(x, copy=True)
        x[masked] = bad
        return x

    for bad in (np.nan, -np.inf, 1e30, -3.0):
        names = ["old_logp", "rollout_logp", "teacher_logp", "ref_logp", "rewards",
                 "teacher_topk_logp"]
        b2 = dataclasses.replace(batch, **{n: scramble(getattr(batch, n), bad) for n in names})
        e2 = {k: scramble(v, bad) for k, v in extra.items()}
        loss2, grads2 = run(b2, e2)
        assert float(loss2) == float(loss), bad
        for g, g2 in zip(grads, grads2):
            np.testing.assert_array_equal(np.asarray(g)[~masked], np.asarray(g2)[~masked])
            assert np.all(np.asarray(g2)[masked] == 0.0)
