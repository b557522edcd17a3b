"""Segment-masked causal flash attention for packed rows on TPUs.

Same contract as `clawjax.kernels.flash_attention` (the GPU kernel): q `[B,T,N,H]`, k/v
`[B,T,K,H]` (K kv heads, G = N / K query heads each, HF's `repeat_kv` order), segment_ids
`[B,T]` int (0 = padding) → `[B,T,N,H]` in q.dtype. Token t attends token s iff s ≤ t and both
carry the same segment id: `clawjax.model.attention.attend` on `causal & (seg[:, :, None] ==
seg[:, None, :])` is the reference it is tested against. Padding (segment 0) attends earlier
padding only, as there, so its rows stay finite and are never scored.

The kernel is JAX's Pallas TPU (Mosaic) flash attention (`jax.experimental.pallas.ops.tpu
.flash_attention`, forward and backward as Pallas kernels, segment ids checked per block): the
`[T,S]` scores live only in VMEM blocks, never in HBM. It wants heads before time (`[B,N,T,H]`)
and as many kv heads as query heads, so the kv heads are repeated to N and the layout is
transposed on the way in and out. T must be a multiple of 128, the TPU lane width (blocks are
the largest of 512/256/128 dividing it). Off a TPU it runs in Pallas' TPU interpreter (exact,
slow: for tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clawjax.kernels.flash_attention import block_size, check_shapes

TPU_BLOCK_CHOICES = (512, 256, 128)


def _tpu_modules():
    try:
        from jax.experimental.pallas import tpu as pltpu
        from jax.experimental.pallas.ops.tpu import flash_attention
    except ImportError as e:
        raise ImportError(
            "model.attention = 'pallas_tpu' needs jax.experimental.pallas.ops.tpu"
            f".flash_attention (present in JAX 0.10 and 0.11), which JAX {jax.__version__} "
            "does not have: use model.attention = 'xla'") from e
    return pltpu, flash_attention


def segment_flash_attention_tpu(q: jax.Array, k: jax.Array, v: jax.Array,
                                segment_ids: jax.Array, *, interpret: bool | None = None
                                ) -> jax.Array:
    """Causal attention within segments (see the module docstring); differentiable in q/k/v.
    `interpret=None` runs the kernel compiled on a TPU and in Pallas' TPU interpreter
    elsewhere."""
    _, t, n, h = check_shapes(q, k, v, segment_ids, "segment_flash_attention_tpu")
    block = block_size(t, TPU_BLOCK_CHOICES, "segment_flash_attention_tpu")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    pltpu, fa = _tpu_modules()
    sizes = fa.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1,
                          block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block,
                          block_q_dkv=block, block_k_major_dq=block, block_k_dq=block,
                          block_q_dq=block)
    g = n // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2).astype(q.dtype), jnp.repeat(v, g, axis=2).astype(q.dtype)

    def attention(q, k, v, seg):
        heads_first = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # noqa: E731 [B,T,N,H]<->[B,N,T,H]
        out = fa.flash_attention(heads_first(q), heads_first(k), heads_first(v),
                                 segment_ids=fa.SegmentIds(q=seg, kv=seg), causal=True,
                                 sm_scale=h ** -0.5, block_sizes=sizes)
        return heads_first(out)

    run = _under_interpreter(attention, pltpu) if interpret else attention
    return run(q, k, v, segment_ids.astype(jnp.int32))


def _under_interpreter(fn, pltpu):
    """`fn` with every pallas_call it builds, its backward's included, in the TPU interpreter.
    The interpreter is picked when a pallas_call is built, and the kernel's backward is built
    only when the gradient is taken, after `fn` has returned: so both halves enter the mode."""

    @jax.custom_vjp
    def run(*args):
        with pltpu.force_tpu_interpret_mode():
            return fn(*args)

    def forward(*args):
        with pltpu.force_tpu_interpret_mode():
            return jax.vjp(fn, *args)  # (output, the vjp closure: a pytree of residuals)

    def backward(vjp, cotangent):
        with pltpu.force_tpu_interpret_mode():
            return vjp(cotangent)

    run.defvjp(forward, backward)
    return run
