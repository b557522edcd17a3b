"""The embedded server's device side: jitted prefill and decode steps over the KV cache.

    prefill(state, cache, tokens [B,T], positions [B,T], targets [B,T], last_idx [B], k)
        -> cache, last_logp [B,V], tok_logp [B,T], top_v [B,T,k], top_i [B,T,k]
    decode(state, cache, tokens [B,1], positions [B,1]) -> cache, logp [B,V]

Rows are right-padded with position -1 (not written, logits ignored). `tok_logp[b, t]` is
log π(targets[b, t] | tokens[b, :t+1]): the caller sets `targets[b, t] = prompt[t + 1]`.
All log-probs are the float32 log-softmax of the model's logits (temperature 1). Prompt
lengths are bucketed to powers of two (>= MIN_BUCKET) so each (B, T, k) compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

MIN_BUCKET = 16


def bucket(n: int, cap: int) -> int:
    """The smallest power of two >= max(n, MIN_BUCKET), capped at `cap`."""
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return min(b, cap)


@functools.lru_cache(maxsize=8)
def make_steps(graphdef):
    """Jitted prefill and decode for one graphdef (architecture), shared by engines serving the
    same architecture so each (batch, bucket) compiles once per process. The cache is
    donated."""

    def prefill(state, cache, tokens, positions, targets, last_idx, k):
        model = nnx.merge(graphdef, state)
        logits, cache = model.forward_cached(tokens, positions, cache)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B,T,V]
        tok_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B,T]
        last = jnp.take_along_axis(logp, last_idx[:, None, None], axis=1)[:, 0]  # [B,V]
        if k:
            top_v, top_i = jax.lax.top_k(logp, k)  # [B,T,k]
        else:
            top_v = top_i = jnp.zeros((0,), jnp.float32)
        return cache, last, tok_logp, top_v, top_i

    def decode(state, cache, tokens, positions):
        model = nnx.merge(graphdef, state)
        logits, cache = model.forward_cached(tokens, positions, cache)
        return cache, jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)  # [B,V]

    return (jax.jit(prefill, static_argnames=("k",), donate_argnums=(1,)),
            jax.jit(decode, donate_argnums=(1,)))
