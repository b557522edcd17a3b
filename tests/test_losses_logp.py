"""Chunked log-probs and entropy (`token_logp_and_entropy`, `sequence_*`) vs full-logit
references: float64 NumPy values, naive jnp gradients, finite differences, and compiled memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import np_reference as ref
from clawjax import losses


def make(rng, lead, d, v, scale=1.0, dtype=np.float32):
    hidden = (rng.normal(size=lead + (d,)) * scale).astype(dtype)
    lm_head = (rng.normal(size=(d, v)) / np.sqrt(d) * 3).astype(dtype)
    targets = rng.integers(0, v, lead).astype(np.int32)
    return hidden, lm_head, targets


def naive(hidden, lm_head, targets):
    """Full [T, V] logits in float32: the baseline the chunked version must equal."""
    logsm = jax.nn.log_softmax(hidden.astype(jnp.float32) @ lm_head.astype(jnp.float32), -1)
    logp = jnp.take_along_axis(logsm, targets[..., None], -1)[..., 0]
    return logp, -jnp.sum(jnp.exp(logsm) * logsm, -1)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31),
       case=st.sampled_from([((13,), 4), ((2, 7), 3), ((64,), 64), ((3, 1), 8), ((40,), 1000)]),
       dims=st.sampled_from([(8, 37), (16, 256)]))
def test_token_logp_and_entropy_match_float64_reference(seed, case, dims):
    (lead, chunk), (d, v) = case, dims
    hidden, lm_head, targets = make(np.random.default_rng(seed), lead, d, v)
    logp, entropy = losses.token_logp_and_entropy(hidden, lm_head, targets, chunk=chunk)
    want_logp, want_entropy = ref.token_logp_entropy(hidden, lm_head, targets)
    assert logp.shape == entropy.shape == lead and logp.dtype == jnp.float32
    np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy, want_entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_chunked_equals_naive_values_and_gradients(chunk):
    rng = np.random.default_rng(chunk)
    hidden, lm_head, targets = make(rng, (2, 23), 12, 97)
    a, b = rng.normal(size=(2, 23)), rng.normal(size=(2, 23))

    def scalar(fn):
        def f(h, w):
            logp, ent = fn(h, w, targets)
            return jnp.sum(a * logp) + jnp.sum(b * ent)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    chunked = scalar(lambda h, w, t: losses.token_logp_and_entropy(h, w, t, chunk=chunk))
    (v1, (gh1, gw1)), (v2, (gh2, gw2)) = chunked(hidden, lm_head), scalar(naive)(hidden, lm_head)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(gh1, gh2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gw1, gw2, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(gw1)).max() > 1e-3


def test_gradients_match_finite_differences_in_float64():
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        hidden, lm_head, targets = make(rng, (9,), 5, 11, dtype=np.float64)
        a, b = rng.normal(size=9), rng.normal(size=9)

        @jax.jit
        def f(h, w):
            logp, ent = losses.token_logp_and_entropy(h, w, targets, chunk=4)
            return jnp.sum(a * logp) + jnp.sum(b * ent)

        gh, gw = jax.grad(f, argnums=(0, 1))(hidden, lm_head)
        assert gh.dtype == jnp.float64
        eps = 1e-6
        for x, g, i in ((hidden, gh, 0), (lm_head, gw, 1)):
            for j in rng.choice(x.size, 12, replace=False):
                idx = np.unravel_index(j, x.shape)
                up, down = x.copy(), x.copy()
                up[idx] += eps
                down[idx] -= eps
                args_up = (up, lm_head) if i == 0 else (hidden, up)
                args_down = (down, lm_head) if i == 0 else (hidden, down)
                fd = (float(f(*args_up)) - float(f(*args_down))) / (2 * eps)
                assert float(g[idx]) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_bfloat16_inputs_are_computed_in_float32():
    rng = np.random.default_rng(8)
    hidden, lm_head, targets = make(rng, (30,), 16, 300, scale=2.0)
    h16, w16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(lm_head, jnp.bfloat16)
    logp, entropy = losses.token_logp_and_entropy(h16, w16, targets, chunk=8)
    assert logp.dtype == entropy.dtype == jnp.float32
    # Against float64 on the same (bf16-rounded) inputs: float32-level agreement.
    want_logp, want_entropy = ref.token_logp_entropy(np.asarray(h16, np.float64),
                                                     np.asarray(w16, np.float64), targets)
    np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy, want_entropy, rtol=1e-5, atol=1e-5)
    gh, gw = jax.grad(lambda h, w: jnp.sum(losses.token_logp_and_entropy(h, w, targets, 8)[0]),
                      argnums=(0, 1))(h16, w16)
    assert gh.dtype == gw.dtype == jnp.bfloat16


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_forward_and_backward_never_hold_full_logits():
    """Compiled fwd+bwd temp memory of the chunked version stays well under one [T, V]
    float32 array, while the naive version needs several."""
    t, d, v, chunk = 1024, 16, 8192, 64
    rng = np.random.default_rng(9)
    hidden, lm_head, targets = make(rng, (t,), d, v)
    full = t * v * 4

    def loss(fn):
        def f(h, w):
            logp, ent = fn(h, w, targets)
            return jnp.sum(logp) + 0.1 * jnp.sum(ent)
        return jax.value_and_grad(f, argnums=(0, 1))

    chunked = _temp_bytes(loss(lambda h, w, x: losses.token_logp_and_entropy(h, w, x, chunk)),
                          hidden, lm_head)
    baseline = _temp_bytes(loss(naive), hidden, lm_head)
    block = chunk * v * 4
    assert baseline >= full
    # A few [chunk, V] blocks (logits, softmax, their cotangents) plus the [D, V] gradient
    # accumulator: bounded by the block size, not by T.
    assert chunked < 6 * block + 2 * d * v * 4 < full / 2, (chunked, block, full)


def _segments_reference(hidden, lm_head, tokens, segment_ids, topk_ids=None):
    """Position by position: value at t from hidden[t−1] if t−1 is in the same non-padding
    segment, else 0."""
    rows, length = tokens.shape
    logp, ent = np.zeros((rows, length)), np.zeros((rows, length))
    topk = None if topk_ids is None else np.zeros(topk_ids.shape)
    for r in range(rows):
        for t in range(1, length):
            if segment_ids[r, t] == 0 or segment_ids[r, t] != segment_ids[r, t - 1]:
                continue
            logsm = ref.log_softmax(ref.f64(hidden[r, t - 1]) @ ref.f64(lm_head))
            logp[r, t] = logsm[tokens[r, t]]
            ent[r, t] = -(np.exp(logsm) * logsm).sum()
            if topk is not None:
                topk[r, t] = logsm[topk_ids[r, t]]
    return logp, ent, topk


def _layout():
    return np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0],
                     [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                     [1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 0]], np.int32)


def test_sequence_logp_and_entropy_alignment_and_zero_gradients():
    rng = np.random.default_rng(10)
    seg = _layout()
    hidden, lm_head, tokens = make(rng, seg.shape, 8, 50)
    logp, ent = losses.sequence_logp_and_entropy(hidden, lm_head, tokens, seg, chunk=7)
    want_logp, want_ent, _ = _segments_reference(hidden, lm_head, tokens, seg)
    np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-6)
    # hidden[t] feeds position t+1 only when t+1 continues t's segment: elsewhere zero gradient.
    gh = jax.grad(lambda h: jnp.sum(sum(losses.sequence_logp_and_entropy(
        h, lm_head, tokens, seg, chunk=7))))(hidden)
    feeds = np.zeros(seg.shape, bool)
    feeds[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    norms = np.abs(np.asarray(gh)).sum(-1)
    assert np.all(norms[~feeds] == 0.0) and np.all(norms[feeds] > 0)


def test_sequence_topk_logp_in_one_pass():
    rng = np.random.default_rng(11)
    seg = _layout()
    hidden, lm_head, tokens = make(rng, seg.shape, 8, 50)
    topk_ids = rng.integers(0, 50, seg.shape + (4,)).astype(np.int32)
    logp, ent, topk = losses.sequence_logp_entropy_topk(hidden, lm_head, tokens, seg, topk_ids,
                                                        chunk=5)
    want_logp, want_ent, want_topk = _segments_reference(hidden, lm_head, tokens, seg, topk_ids)
    assert topk.shape == seg.shape + (4,)
    np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(topk, want_topk, rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_named():
    h, w, t = make(np.random.default_rng(0), (4,), 8, 10)
    with pytest.raises(ValueError, match="lm_head shape"):
        losses.token_logp_and_entropy(h, w.T, t)
    with pytest.raises(ValueError, match="chunk"):
        losses.token_logp_and_entropy(h, w, t, chunk=0)


def test_row_sharded_inputs_give_the_same_values_and_gradients():
    """Rows sharded over a data axis (as the trainer does) change nothing."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(12)
    seg = np.repeat(np.array([[1] * 9 + [2] * 5 + [0] * 2]), 8, axis=0).astype(np.int32)
    hidden, lm_head, tokens = make(rng, seg.shape, 8, 40)

    @jax.jit
    def f(h, w, t, s):
        logp, ent = losses.sequence_logp_and_entropy(h, w, t, s, chunk=16)
        return jnp.sum(logp) + jnp.sum(ent), (logp, ent)

    grad = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
    rows = NamedSharding(mesh, P("data"))
    sharded = [jax.device_put(x, rows) for x in (hidden, tokens, seg)]
    (_, (lp1, e1)), (gh1, gw1) = grad(hidden, lm_head, tokens, seg)
    (_, (lp2, e2)), (gh2, gw2) = grad(sharded[0], lm_head, sharded[1], sharded[2])
    for a, b in ((lp1, lp2), (e1, e2), (gh1, gh2), (gw1, gw2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert gh2.sharding.is_equivalent_to(rows, 3)


def test_lm_head_gradient_is_written_in_place_without_a_dv_accumulator():
    """The vocabulary-block backward writes each [D, chunk] slice of the lm_head gradient into
    the output: compiled temp memory stays below one [D, V] float32 array (the token-chunked
    scan needed a whole [D, V] accumulator besides the output)."""
    t, d, v, chunk = 64, 64, 32768, 256
    hidden, lm_head, targets = make(np.random.default_rng(13), (t,), d, v)

    def f(h, w):
        logp, ent = losses.token_logp_and_entropy(h, w, targets, chunk)
        return jnp.sum(logp) + 0.1 * jnp.sum(ent)

    temp = _temp_bytes(jax.value_and_grad(f, argnums=(0, 1)), hidden, lm_head)
    assert temp < d * v * 4 // 4, (temp, d * v * 4)
