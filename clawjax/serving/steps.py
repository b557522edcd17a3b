"""The embedded server's device side: jitted prefill and decode steps over the KV cache.

    prefill(state, cache, rows [b], tokens [b,T], positions [b,T], targets [b,T], last_idx [b], k)
        -> cache, last_logp [b,V], tok_logp [b,T], top_v [b,T,k], top_i [b,T,k]
    decode(state, cache, tokens [B,1], positions [B,1], window) -> cache, logp [B,V]

Prefill runs only the `b` cache rows it is given (`rows`: distinct row indices into the cache's
B; b <= B is bucketed by the caller), so admitting one request costs one row, not B: the rows
are gathered, prefilled, and scattered back. Prompts start at position 0, so prefill attends
only the first T slots. Decode attends the first `window` slots; every position must be below
it (the caller buckets the window to a power of two over its rows' longest sequence).

Rows are right-padded with position -1 (not written, logits ignored); a padding row of prefill
is written back unchanged. `tok_logp[b, t]` is log π(targets[b, t] | tokens[b, :t+1]): the
caller sets `targets[b, t] = prompt[t + 1]`. All log-probs are the float32 log-softmax of the
model's logits (temperature 1). Lengths, batch sizes and windows are powers of two (>=
MIN_BUCKET for lengths) so each combination compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from clawjax.model.cache import KVCache

MIN_BUCKET = 16


def bucket(n: int, cap: int, least: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, least), capped at `cap`."""
    b = least
    while b < n:
        b *= 2
    return min(b, cap)


@functools.lru_cache(maxsize=8)
def make_steps(graphdef):
    """Jitted prefill and decode for one graphdef (architecture), shared by engines serving the
    same architecture so each (batch, bucket) compiles once per process. The cache is
    donated."""

    def prefill(state, cache, rows, tokens, positions, targets, last_idx, k):
        model = nnx.merge(graphdef, state)
        sub = KVCache(k=cache.k[:, rows], v=cache.v[:, rows])  # [L,b,S,K,H]
        logits, sub = model.forward_cached(tokens, positions, sub, window=tokens.shape[1])
        cache = KVCache(k=cache.k.at[:, rows].set(sub.k), v=cache.v.at[:, rows].set(sub.v))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [b,T,V]
        tok_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [b,T]
        last = jnp.take_along_axis(logp, last_idx[:, None, None], axis=1)[:, 0]  # [b,V]
        if k:
            top_v, top_i = jax.lax.top_k(logp, k)  # [b,T,k]
        else:
            top_v = top_i = jnp.zeros((0,), jnp.float32)
        return cache, last, tok_logp, top_v, top_i

    def decode(state, cache, tokens, positions, window):
        model = nnx.merge(graphdef, state)
        logits, cache = model.forward_cached(tokens, positions, cache, window=window)
        return cache, jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)  # [B,V]

    return (jax.jit(prefill, static_argnames=("k",), donate_argnums=(1,)),
            jax.jit(decode, static_argnames=("window",), donate_argnums=(1,)))
