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
