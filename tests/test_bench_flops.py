"""`clawjax.bench._flops` (the MFU numerator) against independent counts, and the MFU row of
`bench train` end to end on a shrunken shape (the real one needs a GPU).

The references are computed differently from the module: parameter counts from the sizes of the
initialised model's own block matrices, attention pairs by counting a NumPy causal mask."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from clawjax import model as cm
from clawjax.bench import _flops as flops
from clawjax.bench import _mfu as train_mfu
from clawjax.config import TINY_QWEN3

GQA = dict(TINY_QWEN3, hidden_size=96, intermediate_size=160, num_attention_heads=6,
           num_key_value_heads=2, head_dim=24, num_hidden_layers=3)


@pytest.mark.parametrize("hf_config", [TINY_QWEN3, GQA], ids=["tiny", "gqa"])
def test_body_params_equal_the_models_block_matrices(hf_config):
    model = cm.init_random(cm.ModelConfig.from_hf(dict(hf_config)), seed=0)
    matrices = [leaf for leaf in jax.tree.leaves(model.layers) if np.ndim(leaf) >= 2]
    assert flops.body_matrix_params(hf_config) == sum(int(np.size(m)) for m in matrices)


def test_step_flops_equal_a_brute_force_count():
    lengths, scored = [5, 12, 1], [2, 7, 1]
    c = GQA
    pairs = sum(int(np.tril(np.ones((n, n), bool)).sum()) for n in lengths)
    per_pair = 2 * 2 * c["num_attention_heads"] * c["head_dim"]  # q·kᵀ and p·v, 2 FLOPs/MAC
    dense_per_token = 2 * flops.body_matrix_params(c)
    head_per_scored = 2 * c["hidden_size"] * c["vocab_size"]
    forward = (dense_per_token * sum(lengths) + c["num_hidden_layers"] * per_pair * pairs
               + head_per_scored * sum(scored))
    assert flops.train_step_flops(c, lengths, scored) == pytest.approx(3 * forward, rel=1e-12)
    with pytest.raises(ValueError, match="pair up"):
        flops.train_step_flops(c, [1, 2], [1])


def test_peaks_by_device_kind():
    assert flops.peak_bf16_flops("NVIDIA H200") == flops.peak_bf16_flops("NVIDIA H100 80GB HBM3")
    assert flops.peak_bf16_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert flops.peak_bf16_flops("cpu") is None


@pytest.mark.parametrize("attention", ["xla", "pallas_gpu"])
def test_mfu_row_on_a_shrunken_shape(capsys, attention):
    """The product's qwen3_0_6b config (bf16, remat, 2 micro-batches) with a tiny shape and each
    attention implementation (the Pallas kernel interpreted here): the row reports the step's
    FLOPs from the samples actually trained and a finite throughput."""
    r = train_mfu.bench_mfu(1, 2, min_len=16, max_len=64, hf_config=dict(TINY_QWEN3),
                              trainer_overrides={"token_budget": 128, "samples_per_step": 6},
                              matmul_n=128, attention=attention)
    assert r["stack_shape"][0] == 2 and r["config"].model.remat
    assert math.isfinite(r["loss"]) and r["timing"].median > 0 and r["matmul"] > 0
    samples = train_mfu.mfu_samples(dict(TINY_QWEN3), 6, 16, 64)
    assert r["tokens"] == sum(len(s.tokens) for s in samples)
    assert r["step_flops"] == flops.train_step_flops(
        TINY_QWEN3, [len(s.tokens) for s in samples], [s.response_len for s in samples])
    train_mfu.print_mfu(r)
    out = capsys.readouterr().out
    assert ("configs/qwen3_0_6b.py (dtype=bfloat16, remat=True, micro_batches=2, "
            f"attention={attention})") in out
    assert "no datasheet peak" in out  # a CPU has no entry
