"""Logit parity of clawjax.model with transformers (PyTorch CPU) on tiny random checkpoints.

Tolerances (max |diff| of logits against HF float32, logits of magnitude ~3.5):
  float32 params: <= 1e-4 (measured ~3e-6).
  bfloat16 params: <= 0.15 (measured 0.05-0.08; bf16 has 8 mantissa bits, ~2 layers of
  rounding at activations of O(1)).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import hf_tiny
from clawjax import model as cm
from clawjax.model.config import rope_inv_freq

F32_TOL = 1e-4
BF16_TOL = 0.15


@pytest.fixture(scope="module", params=hf_tiny.ARCHS)
def checkpoint(request, tmp_path_factory):
    arch = request.param
    hf = hf_tiny.build(arch)
    path = hf_tiny.save(hf, tmp_path_factory.mktemp(arch))
    tokens = hf_tiny.random_tokens(2, 48, seed=1)
    return arch, hf, path, tokens, hf_tiny.torch_logits(hf, tokens)


def test_f32_parity(checkpoint):
    arch, _, path, tokens, ref = checkpoint
    model, config = cm.from_pretrained(path, dtype=jnp.float32)
    assert config.model_type == arch
    logits = hf_tiny.jit_logits(model, jnp.asarray(tokens))
    assert logits.dtype == jnp.float32 and logits.shape == ref.shape
    diff = float(np.abs(np.asarray(logits) - ref).max())
    print(f"{arch} float32 max|diff| = {diff:.3e}")
    assert diff <= F32_TOL


def test_bf16_parity(checkpoint):
    arch, _, path, tokens, ref = checkpoint
    model, _ = cm.from_pretrained(path, dtype=jnp.bfloat16)
    assert model.embedding[...].dtype == jnp.bfloat16
    logits = hf_tiny.jit_logits(model, jnp.asarray(tokens))
    assert logits.dtype == jnp.float32
    diff = float(np.abs(np.asarray(logits) - ref).max())
    print(f"{arch} bfloat16 max|diff| = {diff:.3e}")
    assert diff <= BF16_TOL


def test_architecture_features_matter(checkpoint):
    """Guard against a parity test that cannot fail: dropping the feature that distinguishes
    each architecture (qk-norm, q/k/v bias, llama3 rope scaling) must break parity."""
    arch, _, path, tokens, ref = checkpoint
    model, config = cm.from_pretrained(path, dtype=jnp.float32)
    if arch == "qwen3":
        for block in model.layers:
            block.attn.qk_norm = False
    elif arch == "qwen2":
        for block in model.layers:
            block.attn.qkv_bias = False
    else:
        model.config = config.replace(rope_scaling=None)
    diff = float(np.abs(np.asarray(hf_tiny.jit_logits(model, jnp.asarray(tokens))) - ref).max())
    assert diff > 100 * F32_TOL


def test_hidden_times_lm_head_is_logits(checkpoint):
    arch, _, path, tokens, _ = checkpoint
    model, config = cm.from_pretrained(path, dtype=jnp.float32)
    hidden = np.asarray(nnx.jit(lambda m, t: m.hidden(t))(model, jnp.asarray(tokens)), np.float64)
    head = np.asarray(model.lm_head(), np.float64)
    assert hidden.shape == (*tokens.shape, config.hidden_size)
    assert head.shape == (config.hidden_size, config.vocab_size)
    if config.tie_word_embeddings:
        np.testing.assert_array_equal(head, np.asarray(model.embedding[...]).T)
    np.testing.assert_allclose(np.asarray(hf_tiny.jit_logits(model, jnp.asarray(tokens))), hidden @ head, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", hf_tiny.ARCHS)
def test_rope_inv_freq_matches_transformers(arch):
    hf_cfg = hf_tiny.hf_config(arch)
    ref, _ = ROPE_INIT_FUNCTIONS[hf_cfg.rope_parameters["rope_type"]](hf_cfg, "cpu") \
        if hf_cfg.rope_parameters["rope_type"] != "default" else (None, None)
    ours = rope_inv_freq(cm.ModelConfig.from_hf(hf_cfg.to_dict()))
    if ref is None:  # default rope: 1 / theta^(2i/d)
        d = cm.ModelConfig.from_hf(hf_cfg.to_dict()).head_dim
        ref = torch.tensor(1.0 / (hf_cfg.rope_parameters["rope_theta"] ** (np.arange(0, d, 2) / d)))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)


def test_config_reads_both_rope_spellings():
    new = hf_tiny.hf_config("llama").to_dict()
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    params = dict(new["rope_parameters"])
    old["rope_theta"] = params.pop("rope_theta")
    old["rope_scaling"] = params
    a, b = cm.ModelConfig.from_hf(new), cm.ModelConfig.from_hf(old)
    assert a == b
    assert a.rope_theta == 500_000.0
    assert a.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    q2 = cm.ModelConfig.from_hf(hf_tiny.hf_config("qwen2").to_dict())
    assert q2.qkv_bias and not q2.o_bias and q2.tie_word_embeddings and q2.head_dim == 16
    q3 = cm.ModelConfig.from_hf(hf_tiny.hf_config("qwen3").to_dict())
    assert q3.qk_norm and q3.head_dim == 32 and q3.rope_scaling is None


@pytest.mark.parametrize("arch, overrides", [
    ("qwen3", {"attention_bias": True, "tie_word_embeddings": True}),
    ("llama", {"attention_bias": True, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
], ids=["qwen3-bias-tied", "llama-bias-plainrope"])
def test_f32_parity_variants(arch, overrides, tmp_path):
    """q/k/v/o bias (Qwen3, Llama), tied Qwen3 embeddings and plain Llama rope."""
    hf = hf_tiny.build(arch, seed=9, **overrides)
    tokens = hf_tiny.random_tokens(2, 20, seed=4)
    model, config = cm.from_pretrained(hf_tiny.save(hf, tmp_path), dtype=jnp.float32)
    assert config.o_bias and config.qkv_bias
    diff = float(np.abs(np.asarray(hf_tiny.jit_logits(model, tokens)) - hf_tiny.torch_logits(hf, tokens)).max())
    assert diff <= F32_TOL
