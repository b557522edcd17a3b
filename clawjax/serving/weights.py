"""Checks that new weights can replace the serving model's before a swap: the same
architecture (the KV cache and the compiled steps depend on it) and parameters of the same
tree structure, shapes and dtypes. Each raises ValueError naming what differs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# ModelConfig fields that do not shape the computation (free-form extras, training options).
_NOT_ARCHITECTURE = ("extra", "remat", "attention")


def _arch(config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in _NOT_ARCHITECTURE}


def check_same_architecture(config, serving) -> None:
    """Raises ValueError listing the fields where ModelConfig `config` differs from the
    serving model's `serving`."""
    new, old = _arch(config), _arch(serving)
    if new != old:
        diff = sorted(k for k, v in new.items() if old[k] != v)
        raise ValueError(f"model_path config differs from the serving model in {diff}; "
                         "expected the same architecture")


def check_same_params(state, current) -> None:
    """Raises ValueError when parameter tree `state` differs from `current` in structure,
    leaf shapes or leaf dtypes."""
    def shapes(t):
        return [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(t)]

    if jax.tree.structure(state) != jax.tree.structure(current) or \
            shapes(state) != shapes(current):
        raise ValueError("model_path holds parameters of other names/shapes/dtypes than "
                         "the serving model; expected the same architecture")
