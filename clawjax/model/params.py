"""HF safetensors checkpoints ↔ NNX `Transformer`: `from_pretrained`, `save_pretrained`.

The mapping (`hf_table`) lists, per NNX parameter, its HF tensor name and layout:
  kind "T": nnx = hf.T.reshape(nnx_shape)   (HF Linear weights are [out, in])
  kind "R": nnx = hf.reshape(nnx_shape)     (embeddings, norms, biases)
Loading reads tensors one by one (memmapped), converts each on the host and places it on the
mesh with its sharding before the next is read: never two full copies of the model in host
memory. Saving fetches one parameter at a time into streamed safetensors files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from clawjax.model import safetensors_io
from clawjax.model.config import ModelConfig
from clawjax.model.errors import CheckpointError
from clawjax.model.transformer import Transformer, abstract_model

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
# Tensors some HF checkpoints carry that the model ignores.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One NNX parameter ↔ one HF tensor."""

    path: tuple          # NNX path, e.g. ("layers", 0, "attn", "q_proj")
    hf_name: str         # e.g. "model.layers.0.self_attn.q_proj.weight"
    nnx_shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    kind: str            # "T" or "R"

    def to_nnx(self, hf: np.ndarray) -> np.ndarray:
        return hf.T.reshape(self.nnx_shape) if self.kind == "T" else hf.reshape(self.nnx_shape)

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        if self.kind == "T":
            return value.reshape(self.hf_shape[::-1]).T
        return value.reshape(self.hf_shape)


def hf_table(config: ModelConfig) -> list[TensorMap]:
    """The full NNX ↔ HF tensor mapping for `config`, in HF checkpoint order."""
    c = config
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    table = [TensorMap(("embedding",), "model.embed_tokens.weight", (v, d), (v, d), "R")]
    for i in range(c.num_hidden_layers):
        pre, at = f"model.layers.{i}.", ("layers", i, "attn")
        table += [
            TensorMap(("layers", i, "attn_norm", "scale"), pre + "input_layernorm.weight", (d,), (d,), "R"),
            TensorMap(at + ("q_proj",), pre + "self_attn.q_proj.weight", (d, n, h), (n * h, d), "T"),
            TensorMap(at + ("k_proj",), pre + "self_attn.k_proj.weight", (d, k, h), (k * h, d), "T"),
            TensorMap(at + ("v_proj",), pre + "self_attn.v_proj.weight", (d, k, h), (k * h, d), "T"),
            TensorMap(at + ("o_proj",), pre + "self_attn.o_proj.weight", (n, h, d), (d, n * h), "T"),
        ]
        if c.qkv_bias:
            table += [
                TensorMap(at + ("q_bias",), pre + "self_attn.q_proj.bias", (n, h), (n * h,), "R"),
                TensorMap(at + ("k_bias",), pre + "self_attn.k_proj.bias", (k, h), (k * h,), "R"),
                TensorMap(at + ("v_bias",), pre + "self_attn.v_proj.bias", (k, h), (k * h,), "R"),
            ]
        if c.o_bias:
            table.append(TensorMap(at + ("o_bias",), pre + "self_attn.o_proj.bias", (d,), (d,), "R"))
        if c.qk_norm:
            table += [
                TensorMap(at + ("q_norm", "scale"), pre + "self_attn.q_norm.weight", (h,), (h,), "R"),
                TensorMap(at + ("k_norm", "scale"), pre + "self_attn.k_norm.weight", (h,), (h,), "R"),
            ]
        table += [
            TensorMap(("layers", i, "mlp_norm", "scale"), pre + "post_attention_layernorm.weight", (d,), (d,), "R"),
            TensorMap(("layers", i, "mlp", "gate_proj"), pre + "mlp.gate_proj.weight", (d, f), (f, d), "T"),
            TensorMap(("layers", i, "mlp", "up_proj"), pre + "mlp.up_proj.weight", (d, f), (f, d), "T"),
            TensorMap(("layers", i, "mlp", "down_proj"), pre + "mlp.down_proj.weight", (f, d), (d, f), "T"),
        ]
    table.append(TensorMap(("final_norm", "scale"), "model.norm.weight", (d,), (d,), "R"))
    if not c.tie_word_embeddings:
        table.append(TensorMap(("lm_head_kernel",), "lm_head.weight", (d, v), (v, d), "T"))
    return table


def _np_dtype(dtype) -> np.dtype:
    dtype = jnp.dtype(dtype)
    return np.dtype(ml_dtypes.bfloat16) if dtype == jnp.bfloat16 else np.dtype(dtype)


def load_config(path: str | os.PathLike) -> ModelConfig:
    """ModelConfig from `path/config.json` (FileNotFoundError naming the path when absent)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {Path(path)} (expected {file})")
    with open(file) as fh:
        return ModelConfig.from_hf(json.load(fh))


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        with open(index) as fh:
            weight_map = json.load(fh).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: expected a 'weight_map' object")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    elif (path / SINGLE_FILE).is_file():
        files = [path / SINGLE_FILE]
    else:
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint shard {file} (listed in {index}) does not exist")
    return files


def _scan(path: Path, config: ModelConfig) -> dict[str, tuple[Path, dict, int]]:
    """Check every checkpoint tensor against the table before reading any data."""
    table = {m.hf_name: m for m in hf_table(config)}
    found: dict[str, tuple[Path, dict, int]] = {}
    for file in _checkpoint_files(path):
        header, start = safetensors_io.read_header(file)
        for name, entry in header.items():
            found[name] = (file, entry, start)
    missing = [f"{name} (expected shape {table[name].hf_shape})" for name in table if name not in found]
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = [f"{name} (shape {tuple(found[name][1]['shape'])})" for name in found
                  if name not in table and name not in ignorable and not name.endswith(_IGNORED_SUFFIXES)]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {len(missing)} tensor(s) for "
                              f"model_type={config.model_type!r}: {', '.join(missing[:10])}")
    if unexpected:
        raise CheckpointError(f"checkpoint {path} has {len(unexpected)} unexpected tensor(s): "
                              f"{', '.join(unexpected[:10])}")
    for name, m in table.items():
        shape = tuple(found[name][1]["shape"])
        if shape != m.hf_shape:
            raise CheckpointError(f"tensor {name}: expected shape {m.hf_shape}, found {shape} in {found[name][0]}")
    return found


def from_pretrained(path: str | os.PathLike, dtype=jnp.bfloat16, mesh=None,
                    remat: bool = False) -> tuple[Transformer, ModelConfig]:
    """(model, config) from an HF directory: config.json + model.safetensors or a sharded index.

    Parameters are cast to `dtype` and placed one at a time on `mesh` (1×1×1 on the first
    device when None) with `clawjax.sharding.param_shardings`.
    """
    path = Path(path)
    config = load_config(path)
    if remat:
        config = config.replace(remat=True)
    found = _scan(path, config)
    graphdef, abstract = abstract_model(config, dtype, mesh)
    specs = {p: v.get_value() for p, v in nnx.to_flat_state(abstract)}
    target = _np_dtype(dtype)
    values = {}
    for m in hf_table(config):
        file, entry, start = found[m.hf_name]
        # astype copies: device buffers may alias host memory, never the (rewritable) file map.
        host = m.to_nnx(safetensors_io.read_tensor(file, entry, start)).astype(target)
        values[m.path] = jax.make_array_from_callback(m.nnx_shape, specs[m.path].sharding, lambda idx, a=host: a[idx])
        del host
    params = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in nnx.to_flat_state(abstract)])
    return nnx.merge(graphdef, params), config


def save_pretrained(model: Transformer, config: ModelConfig, path: str | os.PathLike,
                    dtype=jnp.bfloat16, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write `model` as an HF checkpoint transformers loads as is: config.json plus
    model.safetensors, or model-XXXXX-of-YYYYY.safetensors + model.safetensors.index.json when
    the weights exceed `max_shard_bytes`. Replaces any earlier model*.safetensors / index in
    `path`. Tied embeddings are written once (no lm_head.weight). Returns the written files."""
    target = _np_dtype(dtype)
    params = {p: v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    table = hf_table(config)
    missing = [m.path for m in table if m.path not in params]
    if missing:
        raise CheckpointError(f"model has no parameter(s) {missing[:5]} required by config {config.model_type!r}")

    def fetch(m: TensorMap) -> np.ndarray:
        value = np.asarray(jax.device_get(params[m.path].get_value()))
        return m.to_hf(value).astype(target, copy=False)

    return write_hf_checkpoint(config, path, fetch, dtype, max_shard_bytes)


def write_hf_checkpoint(config: ModelConfig, path: str | os.PathLike,
                        fetch: Callable[[TensorMap], np.ndarray], dtype=jnp.bfloat16,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """The writer behind `save_pretrained`: `fetch(tensor_map)` returns one tensor in HF layout
    (`tensor_map.hf_shape`) and `dtype`; it is called once per tensor in `hf_table(config)`
    order, just before that tensor's bytes are written, so a caller can still be computing
    later tensors (at most one fetched tensor is held here). Same files as `save_pretrained`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    target = _np_dtype(dtype)
    table = hf_table(config)
    shards: list[list[TensorMap]] = [[]]
    size = 0
    for m in table:
        nbytes = math.prod(m.hf_shape) * target.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(m)
        size += nbytes
    for old in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        old.unlink(missing_ok=True)
    by_name = {m.hf_name: m for m in table}

    written, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        name = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += safetensors_io.write_file(path / name, [(m.hf_name, m.hf_shape, target) for m in shard],
                                           lambda hf_name: fetch(by_name[hf_name]))
        weight_map.update({m.hf_name: name for m in shard})
        written.append(path / name)
    if len(shards) > 1:
        with open(path / INDEX_FILE, "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
        written.append(path / INDEX_FILE)
    dtype_name = "bfloat16" if target == np.dtype(ml_dtypes.bfloat16) else str(target)
    with open(path / "config.json", "w") as fh:
        json.dump(config.to_hf(dtype=dtype_name), fh, indent=2)
    written.append(path / "config.json")
    return written
