"""Model FLOPs of one training step, and the accelerator peaks MFU is measured against.

MFU = model FLOPs per step / (step seconds × peak FLOP/s). Model FLOPs count the work the
update needs, not what an implementation happens to do (rematerialisation, masked-out attention
blocks and padding are not counted), with 2 FLOPs per multiply-add and backward = 2 × forward:

- dense: 6 · P_body · n per sample of n tokens, P_body = the decoder blocks' matrix parameters
  (q/k/v/o projections and the three MLP matrices of every layer; norms and biases ignored);
- attention: causal, per layer 2 · N · H · n(n+1) forward (q·kᵀ and p·v, 2 · N · H FLOPs
  each per allowed (query, key) pair, n(n+1)/2 pairs; N query heads of width H), × 3 for
  training; packed samples attend only within themselves, so each counts its own pairs;
- LM head: 6 · D · V per scored position (a response token; clawjax computes logits only
  there, `TokenBatch.score_index`).
"""

from __future__ import annotations

from typing import Iterable

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, by a substring of
# `jax.Device.device_kind`. The H100 and H200 (SXM) share the Hopper SM array: 989.4 TFLOP/s.
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100": 989.4e12,
    "A100": 312e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v4": 275e12,
}


def peak_bf16_flops(device_kind: str) -> float | None:
    """The datasheet bf16 peak for `device_kind` (e.g. "NVIDIA H200"), or None if unknown."""
    for key, flops in PEAK_BF16_FLOPS.items():
        if key.lower() in device_kind.lower():
            return flops
    return None


def _head_dim(hf_config: dict) -> int:
    return hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]


def body_matrix_params(hf_config: dict) -> int:
    """P_body: matrix parameters of all decoder blocks of an HF Qwen3/Llama-style config."""
    d, f = hf_config["hidden_size"], hf_config["intermediate_size"]
    n, k = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    h = _head_dim(hf_config)
    attention = d * n * h + 2 * d * k * h + n * h * d
    return hf_config["num_hidden_layers"] * (attention + 3 * d * f)


def train_step_flops(hf_config: dict, lengths: Iterable[int], scored: Iterable[int]) -> float:
    """Model FLOPs of one update over samples of `lengths` tokens with `scored` response
    positions each (see the module docstring)."""
    lengths, scored = list(lengths), list(scored)
    if len(lengths) != len(scored):
        raise ValueError(f"lengths ({len(lengths)}) and scored ({len(scored)}) must pair up")
    n_heads, layers = hf_config["num_attention_heads"], hf_config["num_hidden_layers"]
    dense = 6.0 * body_matrix_params(hf_config) * sum(lengths)
    twice_pairs = sum(float(n) * (n + 1) for n in lengths)  # 2 × allowed (query, key) pairs
    attention = 6.0 * layers * n_heads * _head_dim(hf_config) * twice_pairs
    head = 6.0 * hf_config["hidden_size"] * hf_config["vocab_size"] * sum(scored)
    return dense + attention + head
