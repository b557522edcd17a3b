"""KV cache: prefill + step-by-step batched decode equals the full forward (<= 1e-5, f32),
for rows of different lengths in one batch, with a jitted fixed-shape cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_tiny
from clawjax import model as cm

MAX_LEN = 24


def _step_fn():
    def step(graphdef, params, tokens, positions, cache):
        return nnx.merge(graphdef, params).forward_cached(tokens, positions, cache)
    return jax.jit(step, static_argnums=0, donate_argnums=4)


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def model(request, tmp_path_factory):
    hf = hf_tiny.build(request.param, seed=7)
    model, _ = cm.from_pretrained(hf_tiny.save(hf, tmp_path_factory.mktemp(request.param)), dtype=jnp.float32)
    return model


def test_prefill_then_decode_equals_full_forward(model):
    rng = np.random.default_rng(0)
    prompt_lens, total_lens = [5, 9, 3], [12, 14, 8]
    seqs = [rng.integers(0, hf_tiny.VOCAB, n).astype(np.int32) for n in total_lens]
    full = [np.asarray(hf_tiny.jit_logits(model, s[None]))[0] for s in seqs]  # [n, V] each

    b, tp = len(seqs), max(prompt_lens)
    tokens = np.zeros((b, tp), np.int32)
    positions = np.full((b, tp), -1, np.int32)  # right padding
    for r, (s, n) in enumerate(zip(seqs, prompt_lens)):
        tokens[r, :n], positions[r, :n] = s[:n], np.arange(n)
    graphdef, params = nnx.split(model, nnx.Param)
    step = _step_fn()
    cache = model.init_cache(b, MAX_LEN)
    assert cache.k.shape == (2, b, MAX_LEN, model.config.num_key_value_heads, model.config.head_dim)
    assert cache.k.dtype == jnp.float32
    logits, cache = step(graphdef, params, tokens, positions, cache)
    logits = np.asarray(logits)
    for r, n in enumerate(prompt_lens):
        np.testing.assert_allclose(logits[r, :n], full[r][:n], atol=1e-5, rtol=0)

    pos = np.array(prompt_lens)
    while (pos < total_lens).any():
        live = pos < total_lens
        tok = np.array([[seqs[r][p] if live[r] else 0] for r, p in enumerate(pos)], np.int32)
        p_in = np.where(live, pos, -1)[:, None].astype(np.int32)
        logits, cache = step(graphdef, params, tok, p_in, cache)
        logits = np.asarray(logits)
        for r in np.flatnonzero(live):
            np.testing.assert_allclose(logits[r, 0], full[r][pos[r]], atol=1e-5, rtol=0,
                                       err_msg=f"row {r} position {pos[r]}")
        pos = pos + live


def test_padding_is_not_written_and_rows_are_independent(model):
    """A padding token (position -1) leaves the cache untouched; a row's decode ignores what
    other rows hold (guard that the test above could fail if rows leaked)."""
    graphdef, params = nnx.split(model, nnx.Param)
    step = _step_fn()
    cache = model.init_cache(2, MAX_LEN)
    tokens = np.array([[3, 4, 5], [6, 7, 8]], np.int32)
    positions = np.array([[0, 1, 2], [0, -1, -1]], np.int32)
    _, cache = step(graphdef, params, tokens, positions, cache)
    k = np.asarray(cache.k)
    assert (np.abs(k[:, 0, :3]).max(axis=(0, 2, 3)) > 0).all()
    assert np.abs(k[:, 1, 1:]).max() == 0 and np.abs(k[:, 0, 3:]).max() == 0
    assert np.abs(k[:, 1, 0]).max() > 0
    # decode row 1 from its own one-token prefix: equals full forward of [6, 9]
    logits, _ = step(graphdef, params, np.array([[0], [9]], np.int32), np.array([[-1], [1]], np.int32), cache)
    ref = np.asarray(hf_tiny.jit_logits(model, np.array([[6, 9]], np.int32)))[0, 1]
    np.testing.assert_allclose(np.asarray(logits)[1, 0], ref, atol=1e-5, rtol=0)


def test_a_window_reads_only_the_first_slots_and_matches_the_full_cache(model):
    """`window=W` attends slots 0..W-1 only: with every position < W the logits equal those of
    the full-cache step (1e-5) and the cache is written the same; slots >= W are never read
    (NaN planted there would poison a masked read: 0 * NaN = NaN)."""
    graphdef, params = nnx.split(model, nnx.Param)

    def step(tokens, positions, cache, window):
        return nnx.merge(graphdef, params).forward_cached(tokens, positions, cache, window=window)

    step = jax.jit(step, static_argnums=3)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, hf_tiny.VOCAB, (2, 6)).astype(np.int32)
    positions = np.array([np.arange(6), [0, 1, 2, 3, -1, -1]], np.int32)
    cache = model.init_cache(2, MAX_LEN)
    garbage = jnp.full_like(cache.k[:, :, 8:], jnp.nan)
    planted = type(cache)(k=cache.k.at[:, :, 8:].set(garbage), v=cache.v.at[:, :, 8:].set(garbage))
    full_logits, full_cache = step(tokens, positions, cache, None)
    win_logits, win_cache = step(tokens, positions, planted, 8)
    np.testing.assert_allclose(np.asarray(win_logits)[0], np.asarray(full_logits)[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(win_logits)[1, :4], np.asarray(full_logits)[1, :4],
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(win_cache.k)[:, :, :8], np.asarray(full_cache.k)[:, :, :8])
    # one decode step at position 6 / 4, windows 8 and the whole cache
    tok, pos = np.array([[5], [7]], np.int32), np.array([[6], [4]], np.int32)
    a, _ = step(tok, pos, full_cache, None)
    b, _ = step(tok, pos, win_cache, 8)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    ref = np.asarray(hf_tiny.jit_logits(model, np.concatenate([tokens[0], [5]])[None]))[0, 6]
    np.testing.assert_allclose(np.asarray(b)[0, 0], ref, atol=1e-5)


@pytest.mark.parametrize("window", [0, MAX_LEN + 1])
def test_a_window_outside_the_cache_is_refused(model, window):
    with pytest.raises(ValueError, match=f"window = {window}"):
        model.forward_cached(jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32),
                             model.init_cache(1, MAX_LEN), window=window)


def test_the_servers_prefill_of_some_rows_leaves_the_others_untouched(model):
    """`serving.steps` prefill runs the given cache rows only: their logits equal the full
    forward's, the rows it was not given are bit-identical, and a padding row (position -1)
    is written back unchanged."""
    from clawjax.serving.steps import make_steps

    graphdef, state = nnx.split(model)
    prefill, decode = make_steps(graphdef)
    rng = np.random.default_rng(2)
    cache = model.init_cache(4, MAX_LEN)
    cache = type(cache)(k=jnp.asarray(rng.normal(size=cache.k.shape), jnp.float32),
                        v=jnp.asarray(rng.normal(size=cache.v.shape), jnp.float32))
    before_k, before_v = np.asarray(cache.k), np.asarray(cache.v)
    prompt = rng.integers(0, hf_tiny.VOCAB, 7).astype(np.int32)
    t = 8
    tokens = np.zeros((2, t), np.int32)
    positions = np.full((2, t), -1, np.int32)
    tokens[0, :7], positions[0, :7] = prompt, np.arange(7)
    targets = np.zeros((2, t), np.int32)
    targets[0, :6] = prompt[1:]
    rows = np.array([2, 0], np.int32)  # row 2 is the request; row 0 is padding
    cache, last, tok_logp, _, _ = prefill(state, cache, rows, tokens, positions, targets,
                                          np.array([6, 0], np.int32), k=0)
    full = np.asarray(hf_tiny.jit_logits(model, prompt[None]))[0]  # [7, V]
    ref_logp = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - full.max(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(last)[0], ref_logp[6], atol=1e-5)
    np.testing.assert_allclose(np.asarray(tok_logp)[0, :6],
                               ref_logp[np.arange(6), prompt[1:]], atol=1e-5)
    after_k, after_v = np.asarray(cache.k), np.asarray(cache.v)
    for r in (0, 1, 3):
        np.testing.assert_array_equal(after_k[:, r], before_k[:, r], err_msg=f"row {r}")
        np.testing.assert_array_equal(after_v[:, r], before_v[:, r], err_msg=f"row {r}")
    np.testing.assert_array_equal(after_k[:, 2, 7:], before_k[:, 2, 7:])  # past the prompt
    assert not np.array_equal(after_k[:, 2, :7], before_k[:, 2, :7])
    # decoding the request's next token from row 2 with a window of 8 matches the full forward
    nxt = np.int32(11)
    dtok = np.zeros((4, 1), np.int32)
    dpos = np.full((4, 1), -1, np.int32)
    dtok[2, 0], dpos[2, 0] = nxt, 7
    cache, logp = decode(state, cache, dtok, dpos, window=8)
    full = np.asarray(hf_tiny.jit_logits(model, np.append(prompt, nxt)[None]))[0, 7]
    ref = full - full.max() - np.log(np.exp(full - full.max()).sum())
    np.testing.assert_allclose(np.asarray(logp)[2], ref, atol=1e-5)
