"""`clawjax.model.attention.attend` (hand-written backward) against the plain autodiff
attention and a NumPy float64 reference: packed segments, grouped-query heads, a fully masked
(padding) query row, float32 and bfloat16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clawjax.model.attention import attend, attend_reference

B, T, N, K, H = 3, 24, 4, 2, 8


def _inputs(dtype):
    rng = np.random.default_rng(0)
    q, k, v, w = (rng.normal(size=s) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H),
                                                (B, T, N, H)))
    seg = np.array([[1] * 8 + [2] * 12 + [0] * 4, [1] * T, [3] * 10 + [4] * 14])
    mask = np.tril(np.ones((T, T), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    mask[2, 5] = False                      # a query that may attend nothing at all
    return q, k, v, w, mask


def _numpy_attention(q, k, v, mask):
    """float64 reference: out[b,t,n] = softmax over allowed keys of q·k/√H, times v."""
    g = N // K
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for n in range(N):
            s = q[b, :, n] @ k[b, :, n // g].T / np.sqrt(H)
            s = np.where(mask[b], s, -1e30)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, n] = (p / p.sum(-1, keepdims=True)) @ v[b, :, n // g]
    return out


def test_forward_matches_float64_numpy():
    q, k, v, _, mask = _inputs(np.float64)
    got = attend(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(mask))
    want = _numpy_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)   # float32 vs float64


def test_gradients_match_autodiff_reference_float32():
    q, k, v, w, mask = _inputs(np.float32)
    args = tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))
    w, mask = jnp.asarray(w, jnp.float32), jnp.asarray(mask)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask) * w)
    got = jax.jit(jax.grad(loss(attend), argnums=(0, 1, 2)))(*args)
    want = jax.grad(loss(attend_reference), argnums=(0, 1, 2))(*args)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6, err_msg=name)
    # the fully masked query (row 2, position 5) passes no gradient to q
    assert float(jnp.abs(got[0][2, 5]).max()) == 0.0


def test_gradients_match_float64_finite_differences():
    """Directional derivative of the float32 custom backward vs a float64 central difference
    of the NumPy reference (independent of JAX autodiff)."""
    q, k, v, w, mask = _inputs(np.float64)
    rng = np.random.default_rng(1)
    dirs = [rng.normal(size=x.shape) for x in (q, k, v)]
    f = lambda q, k, v: float(np.sum(_numpy_attention(q, k, v, mask) * w))
    eps = 1e-6
    fd = (f(*(x + eps * d for x, d in zip((q, k, v), dirs)))
          - f(*(x - eps * d for x, d in zip((q, k, v), dirs)))) / (2 * eps)
    grads = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, jnp.asarray(mask))
                                             * jnp.asarray(w, jnp.float32)), argnums=(0, 1, 2))(
        *(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    analytic = sum(float(np.sum(np.asarray(g, np.float64) * d)) for g, d in zip(grads, dirs))
    assert abs(analytic - fd) <= 1e-4 * max(1.0, abs(fd)), (analytic, fd)


@pytest.mark.parametrize("dtype,atol", [(jnp.bfloat16, 0.06)])
def test_bfloat16_close_to_float32(dtype, atol):
    q, k, v, w, mask = _inputs(np.float32)
    mask = jnp.asarray(mask)
    out32 = attend(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), mask)
    out16 = attend(*(jnp.asarray(x, dtype) for x in (q, k, v)), mask)
    assert out16.dtype == dtype
    np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(out32), atol=atol)
    g = jax.grad(lambda q: jnp.sum(attend(q, *(jnp.asarray(x, dtype) for x in (k, v)), mask)
                                   .astype(jnp.float32)))(jnp.asarray(q, dtype))
    assert g.dtype == dtype and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


@pytest.mark.parametrize("t,blocks", [(256, 4), (128, 4), (192, 4), (100, 4)])
def test_causal_blocks_equal_full_attention(t, blocks):
    """Skipping the all-masked upper key blocks changes neither outputs nor gradients."""
    from clawjax.model.attention import attend_causal
    rng = np.random.default_rng(t)
    q = jnp.asarray(rng.normal(size=(2, t, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, t, K, H)), jnp.float32) for _ in range(2))
    seg = np.sort(rng.integers(0, 4, size=(2, t)), axis=1)
    mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :]))
    w = jnp.asarray(rng.normal(size=(2, t, N, H)), jnp.float32)
    full = lambda q, k, v: jnp.sum(attend(q, k, v, mask) * w)
    blocked = lambda q, k, v: jnp.sum(attend_causal(q, k, v, mask, blocks=blocks) * w)
    np.testing.assert_allclose(np.asarray(attend_causal(q, k, v, mask, blocks=blocks)),
                               np.asarray(attend(q, k, v, mask)), atol=1e-6)
    for a, b in zip(jax.grad(blocked, argnums=(0, 1, 2))(q, k, v),
                    jax.grad(full, argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
