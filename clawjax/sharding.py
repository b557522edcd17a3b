"""Device mesh and logical→mesh sharding rules for the policy's parameters and batches.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded over
`embed`), `tensor` (Megatron-style: heads / mlp / vocab split). Every parameter declares its
logical axes next to its shape (`clawjax.model.layers.param`); `LOGICAL_RULES` maps them here.

Divisibility: a parameter dimension that its mesh axis does not divide raises `ShardingError`
naming the parameter, the dimension and the axis size (no silent fallback to replication).
A 1×1×1 mesh is the single-device case; the code path is the same.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clawjax.model.errors import ShardingError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
}

__all__ = ["MESH_AXES", "LOGICAL_RULES", "ShardingError", "make_mesh", "single_device_mesh",
           "logical_spec", "named_sharding", "param_shardings", "batch_sharding", "shard_model"]


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """Mesh with axes ("data", "fsdp", "tensor") over `devices` (default: all of jax.devices()).

    One size may be -1: it takes the remaining devices. The product of the sizes must divide
    the device count; the first `product` devices are used. Raises ShardingError otherwise.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for axis, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ShardingError(f"mesh axis {axis}={size!r}: expected a positive integer or -1")
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ShardingError(f"mesh sizes {sizes}: at most one axis may be -1, got {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if n % fixed:
            raise ShardingError(f"mesh sizes {sizes}: the fixed axes ({fixed} devices) do not divide "
                                f"the device count {n}")
        sizes[free[0]] = n // fixed
    total = math.prod(sizes.values())
    if n % total:
        raise ShardingError(f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} "
                            f"= {total} devices does not divide the device count {n}")
    shape = (sizes["data"], sizes["fsdp"], sizes["tensor"])
    return Mesh(np.asarray(devices[:total], dtype=object).reshape(shape), MESH_AXES)


def single_device_mesh() -> Mesh:
    """1×1×1 mesh on the first device."""
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def logical_spec(axes: tuple[str | None, ...]) -> P:
    """PartitionSpec for logical `axes` under LOGICAL_RULES (a mesh axis is used at most once)."""
    used: set[str] = set()
    spec: list[Any] = []
    for axis in axes:
        if axis is not None and axis not in LOGICAL_RULES:
            raise ShardingError(f"logical axis {axis!r} has no rule; known: {sorted(LOGICAL_RULES)}")
        mesh_axis = LOGICAL_RULES.get(axis) if axis is not None else None
        names = (mesh_axis,) if isinstance(mesh_axis, str) else tuple(mesh_axis or ())
        if used.intersection(names):
            names = ()
        used.update(names)
        spec.append(None if not names else names[0] if len(names) == 1 else names)
    return P(*spec)


def named_sharding(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh: Mesh,
                   name: str = "array") -> NamedSharding:
    """NamedSharding of an array `shape` with logical `axes`; checks every dim divides its axes."""
    if len(shape) != len(axes):
        raise ShardingError(f"{name}: shape {tuple(shape)} has {len(shape)} dims but logical axes {axes}")
    spec = logical_spec(axes)
    for dim, (size, mesh_axes) in enumerate(zip(shape, spec)):
        if mesh_axes is None:
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
        n = math.prod(mesh.shape[a] for a in mesh_axes)
        if size % n:
            raise ShardingError(
                f"{name}: dimension {dim} ({axes[dim]}) has size {size}, not divisible by mesh axis "
                f"{'x'.join(mesh_axes)} of size {n}")
    return NamedSharding(mesh, spec)


def _path_name(path) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def param_shardings(model_or_state, mesh: Mesh):
    """NamedSharding per parameter, as a pytree matching `nnx.state(model, nnx.Param)`.

    Accepts a model (concrete or from `nnx.eval_shape`) or its Param state. Each Param must
    carry `logical_axes` metadata (declared in `clawjax.model.layers.param`).
    """
    state = model_or_state
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)

    def one(path, variable):
        axes = variable.get_metadata().get("logical_axes")
        name = _path_name(path)
        if axes is None:
            raise ShardingError(f"parameter {name} has no logical_axes metadata")
        return variable.replace(named_sharding(variable.shape, axes, mesh, name=f"parameter {name}"))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a `[R, L, ...]` batch array: rows over data×fsdp, the rest replicated."""
    return NamedSharding(mesh, logical_spec(("batch",) + (None,) * (ndim - 1)))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Move `model`'s params onto `mesh` with their shardings (in place); returns the model."""
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(params, param_shardings(params, mesh)))
    return model
