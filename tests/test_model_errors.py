"""Bad input raises the documented, descriptive error (issue 3 part 6)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch

import hf_tiny
from clawjax import model as cm
from clawjax import sharding


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return hf_tiny.save(hf_tiny.build("qwen3", seed=2), tmp_path_factory.mktemp("qwen3"))


def _copy(src, dst, drop=(), add=None, config_changes=None):
    tensors = safetensors.torch.load_file(src / "model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    safetensors.torch.save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config_changes or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json") as e:
        cm.from_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_missing_weights_file(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        cm.from_pretrained(tmp_path)


def test_index_lists_missing_shard(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        cm.from_pretrained(tmp_path)


def test_unsupported_model_type(saved, tmp_path):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(cm.UnsupportedModelError) as e:
        cm.from_pretrained(tmp_path)
    for word in ("gpt2", "qwen3", "qwen2", "llama"):
        assert word in str(e.value)


@pytest.mark.parametrize("change, words", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, ["yarn", "llama3"]),
    ({"hidden_act": "gelu"}, ["hidden_act", "gelu", "silu"]),
    ({"num_key_value_heads": 3}, ["num_attention_heads=4", "num_key_value_heads=3"]),
    ({"use_sliding_window": True}, ["use_sliding_window"]),
])
def test_unsupported_config_values(change, words):
    d = {**hf_tiny.hf_config("qwen3").to_dict(), **change}
    with pytest.raises(cm.ConfigError) as e:
        cm.ModelConfig.from_hf(d)
    for word in words:
        assert word in str(e.value)


def test_missing_tensor(saved, tmp_path):
    _copy(saved, tmp_path, drop=["model.layers.1.self_attn.k_norm.weight"])
    with pytest.raises(cm.CheckpointError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight \(expected shape \(32,\)\)"):
        cm.from_pretrained(tmp_path)


def test_unexpected_tensor(saved, tmp_path):
    import torch
    _copy(saved, tmp_path, add={"model.layers.0.self_attn.extra.weight": torch.zeros(3, 5)})
    with pytest.raises(cm.CheckpointError, match=r"unexpected.*model\.layers\.0\.self_attn\.extra\.weight \(shape \(3, 5\)\)"):
        cm.from_pretrained(tmp_path)


def test_shape_mismatch(saved, tmp_path):
    _copy(saved, tmp_path, config_changes={"intermediate_size": 96})
    with pytest.raises(cm.CheckpointError,
                       match=r"model\.layers\.0\.mlp\.gate_proj\.weight: expected shape \(96, 64\), found \(128, 64\)"):
        cm.from_pretrained(tmp_path)


def test_mesh_not_dividing_device_count():
    with pytest.raises(cm.ShardingError, match=r"data=3 x fsdp=1 x tensor=1 = 3 devices does not divide the device count 8"):
        sharding.make_mesh(3, 1, 1)
    with pytest.raises(cm.ShardingError, match="device count 8"):
        sharding.make_mesh(data=-1, tensor=3)
    with pytest.raises(cm.ShardingError, match="at most one axis may be -1"):
        sharding.make_mesh(-1, -1, 1)
    with pytest.raises(cm.ShardingError, match="tensor=0"):
        sharding.make_mesh(tensor=0)


def test_dimension_not_divisible_by_mesh_axis():
    config = cm.ModelConfig.from_hf(hf_tiny.hf_config("qwen3", num_key_value_heads=1).to_dict())
    with pytest.raises(cm.ShardingError,
                       match=r"parameter layers\.0\.attn\.k_proj: dimension 1 \(kv_heads\) has size 1, "
                             r"not divisible by mesh axis tensor of size 2"):
        cm.init_random(config, seed=0, mesh=sharding.make_mesh(tensor=2))


def test_bad_tokens():
    config = cm.ModelConfig.from_hf(hf_tiny.hf_config("qwen3").to_dict())
    model = cm.init_random(config, seed=0)
    with pytest.raises(ValueError, match=r"tokens: expected an integer \[B, T\] array"):
        model(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match=r"segment_ids: expected shape \(1, 4\)"):
        model(jnp.zeros((1, 4), jnp.int32), segment_ids=np.ones((1, 5), np.int32))
    with pytest.raises(ValueError, match="forward_cached"):
        model.forward_cached(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 3), jnp.int32), model.init_cache(1, 8))
    assert jax.devices()  # the process is still healthy
