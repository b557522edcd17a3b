"""clawjax.batch: packing layout, buckets, errors, and the loss's invariance to packing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import np_reference as ref
from clawjax import losses
from clawjax.batch import DEFAULT_ROW_BUCKETS, Sample, SampleError, TokenBatch, pack, row_bucket


def random_samples(rng: np.random.Generator, n: int, max_len: int = 30, topk: int = 0,
                   prefix: str = "s") -> list[Sample]:
    out = []
    for i in range(n):
        length = int(rng.integers(2, max_len + 1))
        r = int(rng.integers(1, length))
        kind = str(rng.choice(["rl", "opd", "both"]))
        kw = {}
        if kind != "rl":
            kw["teacher_logp"] = -rng.exponential(1.0, r)
        if topk and rng.random() < 0.7 and kind != "rl":   # top-K data is an OPD signal
            x = rng.normal(size=(r, topk + 2))
            x = x - np.log(np.exp(x).sum(-1, keepdims=True))
            kw["teacher_topk_logp"] = x[:, :topk]
            kw["teacher_topk_ids"] = np.argsort(rng.random((r, 100)), axis=1)[:, :topk]
        out.append(Sample(
            sample_id=f"{prefix}{i}", tokens=rng.integers(0, 100, length), response_len=r,
            loss_mask=(rng.random(r) < 0.85).astype(np.float32),
            rollout_logp=-rng.exponential(1.0, r), kind=kind,
            reward=0.0 if kind == "opd" else float(rng.choice([-1.0, 1.0])), **kw))
    return out


def locate(batches: list[TokenBatch]) -> dict[str, tuple[int, int, int, int]]:
    """sample_id → (batch, row, start, length) from the host bookkeeping."""
    where = {}
    for b, batch in enumerate(batches):
        for r, ids in enumerate(batch.sample_ids):
            for k, sid in enumerate(ids):
                cols = np.flatnonzero(batch.segment_ids[r] == k + 1)
                where[sid] = (b, r, int(cols[0]), len(cols))
    return where


# ---------------------------------------------------------------- layout
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 40), budget=st.sampled_from([30, 47, 128]),
       multiple=st.sampled_from([1, 2, 8]), topk=st.sampled_from([0, 3]))
def test_pack_lays_every_sample_out_exactly_once(seed, n, budget, multiple, topk):
    samples = random_samples(np.random.default_rng(seed), n, topk=topk)
    batches = pack(samples, budget, row_multiple=multiple)
    where = locate(batches)
    assert sorted(where) == sorted(s.sample_id for s in samples)
    used = {b: np.zeros(batch.shape, bool) for b, batch in enumerate(batches)}
    for batch in batches:
        rows, length = batch.shape
        assert length == budget and rows % multiple == 0
        assert rows in {row_bucket(x, DEFAULT_ROW_BUCKETS, multiple) for x in range(1, 65)}
        assert len(batch.sample_ids) == rows
        np.testing.assert_array_equal(batch.old_logp, batch.rollout_logp)
        assert batch.ref_logp is None
        assert (batch.teacher_topk_logp is None) == (not any(
            s.teacher_topk_logp is not None for s in samples))
    for s in samples:
        b, r, start, length = where[s.sample_id]
        batch, p, span = batches[b], s.prompt_len, slice(start, start + length)
        assert length == len(s.tokens)
        used[b][r, span] = True
        np.testing.assert_array_equal(batch.tokens[r, span], s.tokens)
        np.testing.assert_array_equal(batch.positions[r, span], np.arange(length))
        np.testing.assert_array_equal(batch.rewards[r, span], s.reward)
        resp = slice(start + p, start + length)
        np.testing.assert_array_equal(batch.loss_mask[r, start:start + p], 0)
        np.testing.assert_array_equal(batch.loss_mask[r, resp], s.loss_mask)
        np.testing.assert_array_equal(batch.rollout_logp[r, resp], s.rollout_logp)
        np.testing.assert_array_equal(batch.teacher_mask[r, start:start + p], 0)
        np.testing.assert_array_equal(batch.teacher_mask[r, resp], float(s.has_teacher))
        if s.has_teacher:
            np.testing.assert_array_equal(batch.teacher_logp[r, resp], s.teacher_logp)
        if s.teacher_topk_logp is not None:
            np.testing.assert_array_equal(batch.teacher_topk_logp[r, resp], s.teacher_topk_logp)
            np.testing.assert_array_equal(batch.teacher_topk_ids[r, resp], s.teacher_topk_ids)
            np.testing.assert_array_equal(batch.teacher_topk_mask[r, resp], 1.0)
    for b, batch in enumerate(batches):              # everything else is zero padding
        pad = ~used[b]
        np.testing.assert_array_equal(batch.segment_ids[pad], 0)
        for name in ("tokens", "loss_mask", "rewards", "teacher_mask", "rollout_logp"):
            assert not np.any(getattr(batch, name)[pad]), name


def test_first_fit_decreasing_rows_and_buckets():
    lens = [9, 7, 6, 5, 3, 2, 2]                    # FFD into 10: [9], [7, 3], [6, 2, 2], [5]
    samples = [Sample(sample_id=f"x{i}", tokens=np.arange(n) % 7, response_len=1,
                      rollout_logp=[-0.5]) for i, n in enumerate(lens)]
    (batch,) = pack(samples, 10)
    assert batch.sample_ids == (("x0",), ("x1", "x4"), ("x2", "x5", "x6"), ("x3",))
    (batch,) = pack(samples, 10, row_buckets=(3, 6))
    assert batch.shape == (6, 10) and batch.sample_ids[4:] == ((), ())
    batches = pack(samples, 10, row_buckets=(1, 2), row_multiple=1)
    assert [b.shape[0] for b in batches] == [2, 2]
    assert row_bucket(5, (1, 2, 4, 8), 3) == 6 and row_bucket(70, (1, 64), 1) == 128
    assert pack([], 10) == []


def test_pack_packs_a_long_tailed_mix_densely():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.5, 1.2, 300), 16, 4096).astype(int)
    samples = [Sample(sample_id=f"l{i}", tokens=np.zeros(n, np.int32), response_len=n // 2,
                      rollout_logp=np.full(n // 2, -0.5)) for i, n in enumerate(lengths)]
    batches = pack(samples, 4096, row_buckets=(64,))
    real = sum(int((b.segment_ids > 0).sum()) for b in batches)
    rows_used = sum(sum(1 for ids in b.sample_ids if ids) for b in batches)
    assert real == lengths.sum()
    assert real / (rows_used * 4096) > 0.95


# ---------------------------------------------------------------- errors
def test_pack_rejects_a_sample_longer_than_the_budget_naming_it():
    samples = random_samples(np.random.default_rng(1), 3, max_len=10)
    samples.append(Sample(sample_id="too-long", tokens=np.arange(40), response_len=5))
    with pytest.raises(SampleError, match=r"'too-long'.*length 40.*token_budget = 32"):
        pack(samples, 32)


def test_pack_rejects_invalid_duplicate_and_mixed_topk_samples():
    good = random_samples(np.random.default_rng(2), 2, max_len=10)
    bad = Sample(sample_id="neg", tokens=[1, 2, -3], response_len=1)
    with pytest.raises(SampleError, match="'neg'.*tokens"):
        pack(good + [bad], 32)
    with pytest.raises(SampleError, match="sample_id.*unique"):
        pack(good + [dataclasses.replace(good[0])], 32)
    a = Sample(sample_id="k2", tokens=[1, 2, 3], response_len=1, kind="opd", teacher_logp=[-1.0],
               rollout_logp=[-1.0], teacher_topk_logp=[[-1.0, -2.0]], teacher_topk_ids=[[4, 5]])
    b = Sample(sample_id="k3", tokens=[1, 2, 3], response_len=1, kind="opd", teacher_logp=[-1.0],
               rollout_logp=[-1.0], teacher_topk_logp=[[-1.0, -2.0, -3.0]],
               teacher_topk_ids=[[4, 5, 6]])
    with pytest.raises(SampleError, match="'k3'.*K = 3"):
        pack([a, b], 32)
    with pytest.raises(ValueError, match="token_budget"):
        pack(good, 1)
    with pytest.raises(ValueError, match="row_multiple"):
        pack(good, 32, row_multiple=0)
    with pytest.raises(ValueError, match="row_buckets"):
        pack(good, 32, row_buckets=())


def test_pack_wants_rollout_logprobs_unless_told_they_are_not_needed():
    """Under loss.old_logp = 'rollout' a sample's `rollout_logp` is the PPO ratio's old policy:
    one without them is refused naming it. `need_rollout_logp=False` (SFT, probes, 'recompute')
    packs them as zeros, and a sample that has them keeps them."""
    known = random_samples(np.random.default_rng(4), 1, max_len=10)[0]
    unknown = Sample(sample_id="no-logp", tokens=[5, 6, 7, 8], response_len=2)
    with pytest.raises(SampleError) as info:
        pack([known, unknown], 32)
    assert info.value.sample_id == "no-logp" and info.value.field == "rollout_logp"
    assert "need_rollout_logp=False" in str(info.value)
    (batch,) = pack([known, unknown], 32, need_rollout_logp=False)
    for s in (known, unknown):
        r, k = next((r, ids.index(s.sample_id)) for r, ids in enumerate(batch.sample_ids)
                    if s.sample_id in ids)
        resp = np.flatnonzero(batch.segment_ids[r] == k + 1)[-s.response_len:]
        want = np.zeros(s.response_len) if s.rollout_logp is None else s.rollout_logp
        np.testing.assert_array_equal(batch.rollout_logp[r, resp], want)
        np.testing.assert_array_equal(batch.old_logp[r, resp], want)


def test_pack_rejects_top_k_ids_outside_the_vocabulary_naming_the_field():
    """An id >= vocab_size would match no logit and score as if its logit were 0."""
    ok = Sample(sample_id="in", tokens=[1, 2, 3], response_len=1, kind="opd", teacher_logp=[-1.0],
                rollout_logp=[-1.0], teacher_topk_logp=[[-1.0, -2.0]], teacher_topk_ids=[[4, 31]])
    out = dataclasses.replace(ok, sample_id="out", teacher_topk_ids=np.array([[4, 32]]))
    assert len(pack([ok], 32, vocab_size=32)) == 1
    with pytest.raises(SampleError, match=r"'out'.*teacher_topk_ids.*32.*vocab_size 32"):
        pack([ok, out], 32, vocab_size=32)


# ---------------------------------------------------------------- pytree
def test_token_batch_is_a_pytree_that_drops_host_bookkeeping():
    samples = random_samples(np.random.default_rng(3), 5, topk=2)
    (batch,) = pack(samples, 64)
    leaves = jax.tree_util.tree_leaves(batch)
    assert len(leaves) == 12                       # 9 core + 3 top-K arrays, ref_logp None
    on_device = jax.device_put(batch)
    assert isinstance(on_device, TokenBatch) and on_device.sample_ids is None
    assert batch.sample_ids is not None
    new = dataclasses.replace(on_device, old_logp=jnp.zeros(batch.shape))
    assert float(jnp.sum(new.old_logp)) == 0.0
    built = TokenBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)})
    assert built.shape == batch.shape


# ---------------------------------------------------------------- loss over packings
CFG = losses.LossConfig(kl_coef=0.05, entropy_coef=0.01, topk_coef=0.5, use_tis=True,
                        dual_clip=3.0)


def per_sample_inputs(samples, rng):
    """Current-policy values per sample (what a model would give on the response tokens)."""
    out = {"logp": {}, "ref": {}, "entropy": {}, "topk": {}}
    for s in samples:
        r = s.response_len
        out["logp"][s.sample_id] = s.rollout_logp + rng.normal(0, 0.3, r)
        out["ref"][s.sample_id] = s.rollout_logp + rng.normal(0, 0.3, r)
        out["entropy"][s.sample_id] = rng.exponential(1.0, r)
        k = 3
        x = rng.normal(size=(r, k + 2))
        out["topk"][s.sample_id] = (x - np.log(np.exp(x).sum(-1, keepdims=True)))[:, :k]
    return out


def scatter(batch: TokenBatch, samples, values: dict, fill=0.0):
    """Places per-sample response values into the batch's [R, L(, K)] layout."""
    by_id = {s.sample_id: s for s in samples}
    some = next(iter(values.values()))
    out = np.full(batch.shape + some.shape[1:], fill, np.float32)
    for r, ids in enumerate(batch.sample_ids):
        for k, sid in enumerate(ids):
            cols = np.flatnonzero(batch.segment_ids[r] == k + 1)
            out[r, cols[0] + by_id[sid].prompt_len:cols[-1] + 1] = values[sid]
    return out


def packed_terms(samples, inputs, budget, order, buckets=DEFAULT_ROW_BUCKETS, multiple=1):
    shuffled = [samples[i] for i in order]
    total = None
    fn = jax.jit(losses.combined_loss_terms, static_argnums=2)
    for batch in pack(shuffled, budget, row_buckets=buckets, row_multiple=multiple):
        batch_ref = dataclasses.replace(batch, ref_logp=scatter(batch, samples, inputs["ref"]))
        terms = fn(scatter(batch, samples, inputs["logp"], fill=np.nan), batch_ref, CFG,
                   scatter(batch, samples, inputs["entropy"]),
                   scatter(batch, samples, inputs["topk"]))
        total = terms if total is None else losses.add_terms(total, terms)
    return total


@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
def test_loss_is_the_same_however_samples_are_packed(reduction):
    global CFG
    cfg_saved, CFG = CFG, dataclasses.replace(CFG, reduction=reduction)
    try:
        rng = np.random.default_rng(4)
        samples = random_samples(rng, 14, max_len=24, topk=3)
        inputs = per_sample_inputs(samples, rng)
        want = ref.divide(ref.sample_loss(samples, inputs["logp"], dataclasses.asdict(CFG),
                                          ref_logp=inputs["ref"], entropy=inputs["entropy"],
                                          student_topk=inputs["topk"]))
        packings = [(24, list(range(14)), DEFAULT_ROW_BUCKETS, 1),
                    (64, list(rng.permutation(14)), DEFAULT_ROW_BUCKETS, 4),
                    (30, list(rng.permutation(14)), (1, 2), 1),          # 3+ micro-batches
                    (200, list(range(14))[::-1], (1,), 1)]
        for budget, order, buckets, multiple in packings:
            got = losses.divide_terms(packed_terms(samples, inputs, budget, order, buckets,
                                                   multiple))
            assert set(got) == set(want)
            for key in want:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{key} budget={budget}")
    finally:
        CFG = cfg_saved


def test_gradient_accumulation_over_micro_batches_is_exact():
    """Σ grad(loss sum) over micro-batches / Σ denominators == grad of the one-batch loss,
    w.r.t. one flat vector of every sample's response log-probs."""
    rng = np.random.default_rng(5)
    samples = random_samples(rng, 12, max_len=20)
    offsets, total_resp = {}, 0
    for s in samples:
        offsets[s.sample_id] = total_resp
        total_resp += s.response_len
    flat = jnp.asarray(np.concatenate([s.rollout_logp + rng.normal(0, 0.3, s.response_len)
                                       for s in samples]), jnp.float32)
    cfg = losses.LossConfig(dual_clip=3.0)

    def index_of(batch):
        idx = {s.sample_id: offsets[s.sample_id] + np.arange(s.response_len) for s in samples}
        return scatter(batch, samples, idx, fill=-1).astype(np.int32)

    def loss_sum(theta, batch, idx):
        logp = jnp.where(idx >= 0, theta[jnp.maximum(idx, 0)], 0.0)
        s, d = losses.combined_loss_terms(logp, batch, cfg)["loss"]
        return s, d

    grad_sum = jax.jit(jax.grad(loss_sum, has_aux=True))
    value_sum = jax.jit(loss_sum)

    def accumulate(batches):
        g, s, d = jnp.zeros_like(flat), 0.0, 0.0
        for b in batches:
            idx = index_of(b)
            gb, db = grad_sum(flat, b, idx)
            g, s, d = g + gb, s + value_sum(flat, b, idx)[0], d + db
        return g / d, s / d

    g_full, l_full = accumulate(pack(samples, 512, row_buckets=(16,)))
    g_micro, l_micro = accumulate(pack(samples, 20, row_buckets=(1, 2)))
    assert len(pack(samples, 20, row_buckets=(1, 2))) >= 3
    np.testing.assert_allclose(l_micro, l_full, rtol=1e-6)
    np.testing.assert_allclose(g_micro, g_full, rtol=1e-5, atol=1e-8)
    assert np.count_nonzero(np.asarray(g_full)) > total_resp // 2


def test_combined_loss_traces_once_per_bucket_shape():
    traces = []

    def f(logp, batch):
        traces.append(batch.tokens.shape)
        return losses.combined_loss(logp, batch, losses.LossConfig())[0]

    f = jax.jit(f)
    rng = np.random.default_rng(6)
    shapes = []
    for step in range(8):
        samples = random_samples(rng, int(rng.integers(1, 20)), max_len=30, prefix=f"t{step}-")
        for batch in pack(samples, 32, row_buckets=(4, 16)):
            shapes.append(batch.shape)
            f(jnp.asarray(batch.rollout_logp), jax.device_put(batch))
    assert set(shapes) <= {(4, 32), (16, 32)}
    assert len(traces) == len(set(shapes)) and len(shapes) > len(traces)
