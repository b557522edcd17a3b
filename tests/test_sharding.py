"""Sharding on 8 fake CPU devices: data=2 × fsdp=2 × tensor=2 gives the same logits as one
device (<= 1e-5) and parameters really are sharded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import hf_tiny
from clawjax import model as cm
from clawjax import sharding


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = hf_tiny.build("qwen3", seed=11)
    return hf_tiny.save(hf, tmp_path_factory.mktemp("qwen3"))


def test_eight_devices():
    assert len(jax.devices()) == 8, "tests/conftest.py must set --xla_force_host_platform_device_count=8"


def test_make_mesh_sizes():
    mesh = sharding.make_mesh(2, 2, 2)
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh(data=-1, tensor=2).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert dict(sharding.make_mesh(fsdp=-1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    one = sharding.make_mesh(1, 1, 1)
    assert one.devices.size == 1
    assert sharding.make_mesh(2, devices=jax.devices()[4:6]).devices.ravel().tolist() == jax.devices()[4:6]


def _jit_forward(graphdef, param_sh, batch_sh):
    def forward(params, tokens, positions, segment_ids):
        return nnx.merge(graphdef, params)(tokens, positions, segment_ids)
    return jax.jit(forward, in_shardings=(param_sh, batch_sh, batch_sh, batch_sh), out_shardings=None)


def test_sharded_logits_equal_single_device(checkpoint):
    single, config = cm.from_pretrained(checkpoint, dtype=jnp.float32)
    mesh = sharding.make_mesh(2, 2, 2)
    sharded, _ = cm.from_pretrained(checkpoint, dtype=jnp.float32, mesh=mesh)

    q = sharded.layers[0].attn.q_proj[...]
    assert q.sharding.spec == P("fsdp", "tensor", None)
    assert q.sharding.shard_shape(q.shape) == (config.hidden_size // 2, config.num_attention_heads // 2, config.head_dim)
    assert len({s.device for s in q.addressable_shards}) == 8
    assert sharded.embedding[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.layers[1].mlp.down_proj[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.lm_head_kernel[...].sharding.spec == P("fsdp", "tensor")
    assert sharded.final_norm.scale[...].sharding.spec == P(None)

    rng = np.random.default_rng(3)
    tokens = rng.integers(0, hf_tiny.VOCAB, (4, 16)).astype(np.int32)
    positions = np.tile(np.r_[np.arange(10), np.arange(6)], (4, 1)).astype(np.int32)
    segments = np.tile(np.r_[np.ones(10), 2 * np.ones(6)], (4, 1)).astype(np.int32)
    ref = np.asarray(hf_tiny.jit_logits(single, tokens, positions, segments))

    graphdef, params = nnx.split(sharded, nnx.Param)
    forward = _jit_forward(graphdef, sharding.param_shardings(params, mesh), sharding.batch_sharding(mesh))
    out = forward(params, tokens, positions, segments)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(single.layers[0].attn.q_proj[...]), np.asarray(q))


def test_init_random_sharded_equals_single_and_structure_matches():
    config = cm.ModelConfig.from_hf(hf_tiny.hf_config("llama").to_dict())
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = cm.init_random(config, seed=5, mesh=mesh)
    single = cm.init_random(config, seed=5)
    shardings = sharding.param_shardings(sharded, mesh)
    params = nnx.state(sharded, nnx.Param)
    assert jax.tree.structure(shardings) == jax.tree.structure(params)
    for arr, sh in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        assert arr.sharding == sh
    k = sharded.layers[0].attn.k_proj[...]
    assert k.sharding.spec == P("fsdp", "tensor", None) and k.sharding.shard_shape(k.shape)[1] == 1
    tokens = hf_tiny.random_tokens(4, 12, seed=8)
    np.testing.assert_allclose(np.asarray(hf_tiny.jit_logits(sharded, tokens)),
                               np.asarray(hf_tiny.jit_logits(single, tokens)), atol=1e-5, rtol=0)


def test_batch_sharding_and_shard_model():
    mesh = sharding.make_mesh(2, 2, 2)
    bs = sharding.batch_sharding(mesh)
    assert bs.spec == P(("data", "fsdp"), None)
    x = jax.device_put(np.zeros((8, 16), np.int32), bs)
    assert x.sharding.shard_shape(x.shape) == (2, 16)
    config = cm.ModelConfig.from_hf(hf_tiny.hf_config("qwen2").to_dict())
    model = sharding.shard_model(cm.init_random(config, seed=1), mesh)
    emb = model.embedding[...]
    assert emb.sharding.spec == P("tensor", "fsdp") and emb.sharding.shard_shape(emb.shape) == (150, 32)


def test_abstract_model_carries_shardings():
    config = cm.ModelConfig.from_hf(hf_tiny.hf_config("qwen3").to_dict())
    mesh = sharding.make_mesh(2, 2, 2)
    graphdef, abstract = cm.abstract_model(config, jnp.bfloat16, mesh)
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jnp.bfloat16 for x in leaves)
    emb = abstract["embedding"].get_value()
    assert emb.shape == (hf_tiny.VOCAB, 64) and emb.sharding.spec == P("tensor", "fsdp")
    n_params = sum(int(np.prod(x.shape)) for x in leaves)
    model = cm.init_random(config, seed=0, dtype=jnp.bfloat16, mesh=mesh)
    assert n_params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
