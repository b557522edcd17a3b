"""Training self-attention through a Pallas kernel (`model.attention` = "pallas_gpu" or
"pallas_tpu"), run shard by shard on a multi-device mesh.

A pallas_call is opaque to XLA's SPMD partitioner: given sharded operands, it would gather them
and compute every row and head on every device. Under `jax.shard_map` each device runs the
kernel on its own block instead: rows split over the batch's mesh axes, heads over the heads'
axis, the layouts `clawjax.sharding.LOGICAL_RULES` already gives the batch and the q/k/v
projections, so the wrapper adds no communication. Attention never mixes rows or heads, and
query head n reads kv head n // G: splitting the N query heads and the K kv heads over the same
devices keeps every query head with its kv head.
"""

from __future__ import annotations

import jax

from clawjax.model.config import ATTENTION_IMPLEMENTATIONS

KERNEL_IMPLEMENTATIONS = tuple(a for a in ATTENTION_IMPLEMENTATIONS if a != "xla")


def _kernel(implementation: str):
    if implementation == "pallas_gpu":
        from clawjax.kernels.flash_attention import segment_flash_attention
        return segment_flash_attention
    if implementation == "pallas_tpu":
        from clawjax.kernels.tpu_flash_attention import segment_flash_attention_tpu
        return segment_flash_attention_tpu
    raise ValueError(f"kernel_attention: implementation={implementation!r}: expected one of "
                     f"{KERNEL_IMPLEMENTATIONS}")


def kernel_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     implementation: str, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    """Causal attention within segments: q `[B,T,N,H]`, k/v `[B,T,K,H]`, segment_ids `[B,T]`
    (0 = padding) → `[B,T,N,H]`, by the kernel `implementation` names. On a `mesh` of more than
    one device each device computes its block: B split over the "batch" logical axis's mesh
    axes, N and K over the "heads"/"kv_heads" axis (all must divide evenly: `ShardingError`)."""
    kernel = _kernel(implementation)
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, segment_ids)
    from clawjax import sharding  # local: clawjax.sharding imports the model package

    # named_sharding checks that every split dimension divides evenly (ShardingError otherwise).
    spec = lambda name, shape, axes: sharding.named_sharding(  # noqa: E731
        shape, axes, mesh, name=f"kernel_attention {name}").spec
    q_spec = spec("q", q.shape, ("batch", "seq", "heads", "head_dim"))
    kv_spec = spec("k", k.shape, ("batch", "seq", "kv_heads", "head_dim"))
    seg_spec = spec("segment_ids", segment_ids.shape, ("batch", "seq"))
    # check_vma off: pallas_call has no replication rule; the specs above say what varies.
    sharded = jax.shard_map(kernel, mesh=mesh, check_vma=False,
                            in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec)
    return sharded(q, k, v, segment_ids)
