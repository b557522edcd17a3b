"""`KVCache`: fixed-shape key/value cache for incremental decoding (a jit-able pytree).

Slot s of row b holds the k/v of the token at position s of that row; a query at position p
attends slots 0..p of its own row. Rows are independent (each may be at a different length).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """k, v: `[layers, B, S, kv_heads, head_dim]`; S = max_len, the largest position + 1."""

    k: jax.Array
    v: jax.Array

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(num_layers: int, batch_size: int, max_len: int, kv_heads: int, head_dim: int,
               dtype=jnp.bfloat16) -> KVCache:
    """All-zero cache `[num_layers, batch_size, max_len, kv_heads, head_dim]`."""
    shape = (num_layers, batch_size, max_len, kv_heads, head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def cache_mask_and_slots(positions: jax.Array, max_len: int,
                         window: int | None = None) -> tuple[jax.Array, jax.Array]:
    """For positions `[B,T]` (negative = padding): write slots `[B,T]` and mask `[B,T,W]` over
    the first W = `window` (default `max_len`) slots.

    Padding tokens get slot `max_len` (dropped by the scatter) and an all-False mask row.
    A position >= max_len is likewise not written (the caller must size the cache); a position
    >= W would attend a truncated history, so callers keep every position < W.
    """
    window = max_len if window is None else window
    slots = jnp.where(positions >= 0, positions, max_len)
    mask = jnp.arange(window)[None, None, :] <= positions[:, :, None]
    return slots, mask
