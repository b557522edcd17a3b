"""A publish's snapshot of the policy: taken at once on the trainer's thread, written later.

`take(params, config, dtype)` detaches what a publish needs from the trainer's buffers (the
trainer may donate or overwrite them right after it returns); `write(snapshot, graphdef, config,
path, dtype)` writes the HF checkpoint files (safetensors in `dtype`, config.json) into `path`
on the publisher's thread. On multi-host runs `take` all-gathers: every process must call it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _leaf(x, dtype):
    """A copy in the publish dtype the trainer cannot donate away: cast (or copied) on device
    when this process holds the whole array (the cast halves the bytes to move for bfloat16),
    else all-gathered to host (a collective: every process must call it). Non-float leaves
    keep their dtype."""
    target = jnp.dtype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else None
    if not isinstance(x, jax.Array):
        return np.array(x, dtype=target, copy=True)
    if x.is_fully_addressable:
        if target is None or x.dtype == target:
            return jnp.array(x, copy=True)
        return x.astype(target)
    from jax.experimental import multihost_utils
    host = multihost_utils.process_allgather(x, tiled=True)
    return host if target is None else host.astype(target)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _to_hf(value, tensor_map, dtype):
    """One parameter in its HF checkpoint layout and dtype (`tensor_map`: a `TensorMap`)."""
    return tensor_map.to_hf(value).astype(dtype)


def take(params, config, dtype) -> tuple:
    """What a publish needs, detached from the trainer's buffers. On a single host:
    ("hf", {hf_name: HF-layout tensor on device}), one small jitted cast + transpose per tensor
    dispatched asynchronously, so the writer can write the first tensors while XLA still
    computes the later ones. Otherwise ("tree", params snapshot via `_leaf`)."""
    from clawjax.model import hf_table

    flat = {p: v.get_value() for p, v in nnx.to_flat_state(params)}
    table = hf_table(config)
    if set(flat) == {m.path for m in table} and all(
            isinstance(x, jax.Array) and x.is_fully_addressable for x in flat.values()):
        target = jnp.dtype(dtype)
        return "hf", {m.hf_name: _to_hf(flat[m.path], m, target) for m in table}
    return "tree", jax.tree.map(lambda x: _leaf(x, dtype), params)


def write(snapshot, graphdef, config, path: Path, dtype) -> None:
    """Writes the HF checkpoint files of a `take` snapshot into `path`. An "hf" snapshot's tensors
    are fetched one at a time as the writer reaches them (contiguous bytes, no host transpose)."""
    from clawjax.model import save_pretrained, write_hf_checkpoint

    kind, arrays = snapshot
    if kind == "tree":
        save_pretrained(nnx.merge(graphdef, jax.device_get(arrays)), config, path, dtype=dtype)
        return

    def fetch(tensor_map):
        return np.asarray(jax.device_get(arrays.pop(tensor_map.hf_name)))

    write_hf_checkpoint(config, path, fetch, dtype)
