"""Export round trip: clawjax save_pretrained → transformers from_pretrained gives the same
logits, and clawjax from_pretrained of the export gives the same parameters; single-file and
sharded-with-index exports."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import hf_tiny
from clawjax import model as cm


@pytest.fixture(scope="module", params=hf_tiny.ARCHS)
def loaded(request, tmp_path_factory):
    arch = request.param
    hf = hf_tiny.build(arch, seed=3)
    path = hf_tiny.save(hf, tmp_path_factory.mktemp(arch))
    model, config = cm.from_pretrained(path, dtype=jnp.float32)
    tokens = hf_tiny.random_tokens(2, 24, seed=2)
    return arch, model, config, tokens, hf_tiny.torch_logits(hf, tokens)


def _flat_params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_round_trip(loaded, sharded, tmp_path):
    arch, model, config, tokens, ref = loaded
    kwargs = {"max_shard_bytes": 40_000} if sharded else {}
    files = cm.save_pretrained(model, config, tmp_path, dtype=jnp.float32, **kwargs)
    names = sorted(p.name for p in tmp_path.iterdir())
    if sharded:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and "model.safetensors" not in names
        assert names == sorted(shards + ["config.json", "model.safetensors.index.json"])
        assert set(index["weight_map"]) == {m.hf_name for m in cm.hf_table(config)}
    else:
        assert names == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in files) == names

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                 "llama": "LlamaForCausalLM"}[arch]
    np.testing.assert_allclose(hf_tiny.torch_logits(hf, tokens), ref, atol=1e-6, rtol=0)

    again, config2 = cm.from_pretrained(tmp_path, dtype=jnp.float32)
    assert config2 == config
    a, b = _flat_params(model), _flat_params(again)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


def test_bf16_export_loads_in_transformers_as_bf16(loaded, tmp_path):
    arch, model, config, tokens, ref = loaded
    cm.save_pretrained(model, config, tmp_path, dtype=jnp.bfloat16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["model_type"] == arch
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    expect = np.asarray(model.embedding[...]).astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(hf.model.embed_tokens.weight.detach().float().numpy(), expect)
    again, _ = cm.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert again.embedding[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(again.embedding[...], np.float32), expect)


def test_export_replaces_a_previous_sharded_export(loaded, tmp_path):
    _, model, config, tokens, ref = loaded
    cm.save_pretrained(model, config, tmp_path, dtype=jnp.float32, max_shard_bytes=40_000)
    cm.save_pretrained(model, config, tmp_path, dtype=jnp.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_config_round_trip_keeps_extra_keys():
    d = hf_tiny.hf_config("qwen3", eos_token_id=7, bos_token_id=5).to_dict()
    config = cm.ModelConfig.from_hf(d)
    out = config.to_hf()
    assert out["eos_token_id"] == 7 and out["bos_token_id"] == 5
    assert cm.ModelConfig.from_hf(out) == config
    assert hash(cm.ModelConfig.from_hf(out)) == hash(config)


def test_init_random_export_loads_in_transformers(tmp_path):
    config = cm.ModelConfig.from_hf(hf_tiny.hf_config("qwen3").to_dict())
    model = cm.init_random(config, seed=0)
    cm.save_pretrained(model, config, tmp_path, dtype=jnp.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = hf_tiny.random_tokens(1, 10)
    np.testing.assert_allclose(np.asarray(hf_tiny.jit_logits(model, tokens)), hf_tiny.torch_logits(hf, tokens),
                               atol=1e-5, rtol=0)
    assert jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype == jnp.float32


def test_load_is_tensor_by_tensor(tmp_path):
    """Host memory stays bounded by a few tensors, not the checkpoint: the peak of
    Python/numpy allocations while loading is well under the checkpoint size (a loader that
    read every tensor before placing them would need at least the full size)."""
    import tracemalloc

    path = hf_tiny.save(hf_tiny.build("qwen3", intermediate_size=1024, vocab_size=2000), tmp_path)
    total = (path / "model.safetensors").stat().st_size
    cm.from_pretrained(path, dtype=jnp.float32)  # warm caches (tracing, imports)
    tracemalloc.start()
    try:
        model, _ = cm.from_pretrained(path, dtype=jnp.float32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.75 * total, (peak, total)
    assert model.lm_head_kernel[...].shape == (64, 2000)


def test_write_hf_checkpoint_fetches_each_tensor_once_in_table_order(loaded, tmp_path):
    """The writer behind save_pretrained (and the publisher) asks for one HF-layout tensor at a
    time, in `hf_table` order, and writes files byte-identical to save_pretrained's; a fetched
    tensor of the wrong shape is refused with its name."""
    _, model, config, _, _ = loaded
    params = _flat_params(model)
    table = cm.hf_table(config)
    asked = []

    def fetch(m):
        asked.append(m.hf_name)
        return m.to_hf(params[m.path]).astype(np.float32)

    cm.write_hf_checkpoint(config, tmp_path / "w", fetch, jnp.float32, max_shard_bytes=40_000)
    cm.save_pretrained(model, config, tmp_path / "s", dtype=jnp.float32, max_shard_bytes=40_000)
    assert asked == [m.hf_name for m in table]
    written = sorted(p.name for p in (tmp_path / "w").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "s").iterdir()) and len(written) > 3
    for name in written:
        assert (tmp_path / "w" / name).read_bytes() == (tmp_path / "s" / name).read_bytes(), name

    bad = table[1]
    with pytest.raises(ValueError, match=bad.hf_name.replace(".", r"\.")):
        cm.write_hf_checkpoint(config, tmp_path / "bad",
                               lambda m: fetch(m)[:1] if m == bad else fetch(m), jnp.float32)


def test_reloading_traces_the_model_once_and_gives_independent_models(loaded, tmp_path,
                                                                      monkeypatch):
    """A serving process reloads the same architecture on every weight update: the traced
    structure is cached, yet each load is its own model with the checkpoint's values, and a
    caller mutating its abstract state or its model does not reach the next one."""
    _, model, config, _, _ = loaded
    first = cm.save_pretrained(model, config, tmp_path / "v1", dtype=jnp.float32)
    assert first
    calls = []
    real_eval_shape = nnx.eval_shape
    monkeypatch.setattr(nnx, "eval_shape",
                        lambda *a, **k: calls.append(1) or real_eval_shape(*a, **k))
    a, _ = cm.from_pretrained(tmp_path / "v1", dtype=jnp.float32)
    _, abstract = cm.abstract_model(config, jnp.float32)
    next(iter(nnx.to_flat_state(abstract)))[1].set_value(None)  # a careless caller
    b, _ = cm.from_pretrained(tmp_path / "v1", dtype=jnp.float32)
    monkeypatch.undo()
    assert len(calls) <= 1  # at most the first load traced (an earlier test may have)
    want = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for m in (a, b):
        for (path, got), (_, ref) in zip(nnx.to_flat_state(nnx.state(m, nnx.Param)), want):
            np.testing.assert_array_equal(np.asarray(got.get_value()), np.asarray(ref.get_value()),
                                          err_msg=str(path))
    emb = a.embedding
    emb.set_value(emb.get_value() + 1.0)
    np.testing.assert_array_equal(np.asarray(b.embedding.get_value()),
                                  np.asarray(model.embedding.get_value()))
