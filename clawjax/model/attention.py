"""Softmax attention with a hand-written, memory-lean backward pass.

Shapes: q `[B,T,N,H]`, k/v `[B,S,K,H]`, mask `[B,T,S]` bool (True = may attend), output
`[B,T,N,H]`; query head n uses kv head n // G with G = N / K (HF's `repeat_kv` order).

Forward: scores `s = q·kᵀ / √H` in float32, masked to a large finite negative, then
`out = (exp(s − m) · v) / l` with the row max `m` and row sum `l` (the normalisation is applied
to the `[T,H]` output, not to the `[T,S]` probabilities). The residuals for the backward pass
are q, k, v, mask, the output, `m` and `1 / l` (`[B,K,G,T]` each; not `m + log l`, which
float32 cannot hold for a fully masked row): no `[T,S]` array is kept. The backward pass
recomputes `p = exp(s − m) / l` once and forms
`ds = p · (dp − rowsum(dO · O))` (the softmax Jacobian applied in one pass), then the four
products. Masked entries get no gradient, also in a fully masked (padding) row, whose output is
a finite uniform average like the autodiff reference's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED = float(jnp.finfo(jnp.float32).min)  # finite: fully masked (padding) rows stay NaN-free


def _scores(qg: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """qg `[B,T,K,G,H]`, k `[B,S,K,H]` → masked, scaled scores `[B,K,G,T,S]` float32."""
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    s = s * (qg.shape[-1] ** -0.5)
    return jnp.where(mask[:, None, None, :, :], s, MASKED)


def _forward(q, k, v, mask):
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)
    s = _scores(qg, k, mask)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    l = jnp.sum(e, axis=-1, keepdims=True)                              # [B,K,G,T,1]
    unnorm = jnp.einsum("BKGTS,BSKH->BTKGH", e.astype(q.dtype), v,
                        preferred_element_type=jnp.float32)
    inv_l = jnp.moveaxis(1.0 / l[..., 0], 3, 1)[..., None]              # [B,T,K,G,1]
    out = (unnorm * inv_l).astype(q.dtype).reshape(b, t, n, h)
    return out, (m[..., 0], 1.0 / l[..., 0])                            # [B,K,G,T] each


@jax.custom_vjp
def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention (see the module docstring): `[B,T,N,H]`, in q.dtype."""
    return _forward(q, k, v, mask)[0]


def _attend_fwd(q, k, v, mask):
    out, (m, inv_l) = _forward(q, k, v, mask)
    return out, (q, k, v, mask, out, m, inv_l)


def _attend_bwd(res, d_out):
    q, k, v, mask, out, m, inv_l = res
    b, t, n, h = q.shape
    kv = k.shape[2]
    g = n // kv
    qg = q.reshape(b, t, kv, g, h)
    dog = d_out.reshape(b, t, kv, g, h)
    p = jnp.exp(_scores(qg, k, mask) - m[..., None]) * inv_l[..., None]  # [B,K,G,T,S] f32
    dv = jnp.einsum("BKGTS,BTKGH->BSKH", p.astype(v.dtype), dog,
                    preferred_element_type=jnp.float32)
    dp = jnp.einsum("BTKGH,BSKH->BKGTS", dog, v, preferred_element_type=jnp.float32)
    row = jnp.sum(dog.astype(jnp.float32) * out.reshape(b, t, kv, g, h).astype(jnp.float32),
                  axis=-1)                                              # [B,T,K,G]
    row = jnp.transpose(row, (0, 2, 3, 1))[..., None]                  # [B,K,G,T,1]
    ds = jnp.where(mask[:, None, None, :, :], p * (dp - row), 0.0) * (h ** -0.5)
    dq = jnp.einsum("BKGTS,BSKH->BTKGH", ds.astype(q.dtype), k,
                    preferred_element_type=jnp.float32).reshape(b, t, n, h)
    dk = jnp.einsum("BKGTS,BTKGH->BSKH", ds.astype(q.dtype), qg,
                    preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


attend.defvjp(_attend_fwd, _attend_bwd)


def attend_reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """The same attention written plainly (autodiff backward): the tests' reference."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)
    probs = jax.nn.softmax(_scores(qg, k, mask), axis=-1).astype(q.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def attend_causal(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                  blocks: int = 4, min_block: int = 64) -> jax.Array:
    """`attend` for self-attention whose `mask` `[B,T,T]` is causal (a subset of t ≥ s, with
    every query allowed itself): query block i attends keys of blocks 0..i only, skipping the
    all-masked upper blocks (about 1 − (blocks + 1) / (2 · blocks) of the score work; fewer
    blocks when they would be shorter than `min_block`: small blocks cost more in dispatch than
    they save). Same result as `attend` on the full mask."""
    t = q.shape[1]
    blocks = min(blocks, t // min_block)
    if blocks <= 1 or t % blocks:
        return attend(q, k, v, mask)
    size = t // blocks
    outs = [attend(q[:, i * size:(i + 1) * size], k[:, :(i + 1) * size], v[:, :(i + 1) * size],
                   mask[:, i * size:(i + 1) * size, :(i + 1) * size]) for i in range(blocks)]
    return jnp.concatenate(outs, axis=1)
