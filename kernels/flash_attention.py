"""Segment-masked causal flash attention for packed rows on GPUs.

q `[B,T,N,H]`, k/v `[B,T,K,H]` (K kv heads, G = N / K query heads each, HF's `repeat_kv`
order), segment_ids `[B,T]` int (0 = padding) → `[B,T,N,H]` in q.dtype. Token t attends token
s iff s ≤ t and both carry the same segment id: the same mask as `clawjax.model.attention`'s
`attend` on `causal & (seg[:, :, None] == seg[:, None, :])`, which is the reference this is
tested against (`interpret=True` on the CPU). Padding (segment 0) attends earlier padding only,
as there, so its rows stay finite and are never scored.

The kernel is JAX's Pallas Triton flash attention (`jax.experimental.pallas.ops.gpu.attention
.mha`, forward and backward as Pallas kernels): the `[T,S]` scores live only in on-chip
blocks, never in HBM, where the XLA path writes and rereads them several times per layer. The
kv heads are repeated to N for it (a `[B,T,N,H]` copy, small beside the scores it saves). T
must be a multiple of 16 (the block sizes are the largest of 128/64/32/16 dividing it).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

BLOCK_CHOICES = (128, 64, 32, 16)


def block_size(length: int, choices: tuple[int, ...] = BLOCK_CHOICES,
               kernel: str = "segment_flash_attention") -> int:
    """The largest of `choices` (descending) dividing `length`; ValueError naming `kernel`
    when none does."""
    for block in choices:
        if length % block == 0:
            return block
    raise ValueError(f"{kernel}: sequence length T={length}: expected a multiple "
                     f"of {choices[-1]} (the kernel's smallest block)")


def check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                 kernel: str) -> tuple[int, int, int, int]:
    """(B, T, N, H) of q `[B,T,N,H]` after checking k == v `[B,T,K,H]` with K dividing N and
    segment_ids `[B,T]`; ValueError naming `kernel` and the shapes otherwise."""
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h or n % k.shape[2]:
        raise ValueError(f"{kernel}: q {q.shape}, k {k.shape}, v {v.shape}: "
                         "expected k == v shape [B,T,K,H] with K dividing N of q [B,T,N,H]")
    if segment_ids.shape != (b, t):
        raise ValueError(f"{kernel}: segment_ids {segment_ids.shape}: expected "
                         f"[B,T] = {(b, t)}")
    return b, t, n, h


def _mha_module():
    with warnings.catch_warnings():  # the module announces its successor (tokamax) on import
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from jax.experimental.pallas.ops.gpu import attention
        except ImportError as e:
            raise ImportError(
                "model.attention = 'pallas_gpu' needs jax.experimental.pallas.ops.gpu.attention "
                f"(present in JAX 0.10 and 0.11), which JAX {jax.__version__} does not have: "
                "use model.attention = 'xla'") from e
    return attention


def segment_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                            *, interpret: bool | None = None) -> jax.Array:
    """Causal attention within segments (see the module docstring); differentiable in q/k/v.
    `interpret=None` runs the kernel compiled on a GPU and in Pallas' interpreter elsewhere
    (exact, slow: for tests)."""
    b, t, n, h = check_shapes(q, k, v, segment_ids, "segment_flash_attention")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    attention = _mha_module()
    block = block_size(t)
    small = min(block, 32)
    sizes = attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=small,
                                 block_kv_dkv=small, block_q_dq=small, block_kv_dq=small)
    g = n // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    return attention.mha(q, k.astype(q.dtype), v.astype(q.dtype), segment_ids.astype(jnp.int32),
                         sm_scale=h ** -0.5, causal=True, block_sizes=sizes, interpret=interpret)
