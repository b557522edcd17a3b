"""Tiny random HF models (Qwen3 untied, Qwen2 tied with q/k/v bias, Llama 3 with llama3 rope
scaling) built from configs — never downloaded. Shared by the model tests and other suites.

    model = build("qwen3")            # torch model, eval mode, float32, norms/biases perturbed
    path = save(model, tmp_path)      # HF save_pretrained directory
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

ARCHS = ("qwen3", "qwen2", "llama")
VOCAB = 300

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-6, initializer_range=0.1)


def hf_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    """A tiny config for `arch` ("qwen3" | "qwen2" | "llama")."""
    if arch == "qwen3":
        # head_dim decoupled from hidden_size / heads (64 / 4 = 16).
        cfg = transformers.Qwen3Config(**{**_COMMON, "head_dim": 32, "tie_word_embeddings": False,
                                          "rope_theta": 1_000_000.0, **overrides})
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**{**_COMMON, "tie_word_embeddings": True, **overrides})
    elif arch == "llama":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16, "rope_theta": 500_000.0}
        cfg = transformers.LlamaConfig(**{**_COMMON, "tie_word_embeddings": False,
                                          "rope_parameters": rope, **overrides})
    else:
        raise ValueError(f"arch={arch!r}: expected one of {ARCHS}")
    return cfg


def build(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """Random float32 `*ForCausalLM` in eval mode; norm scales ~ N(1, 0.3), biases ~ N(0, 0.3)
    so that they matter for parity."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                torch.nn.init.normal_(p, mean=1.0, std=0.3)
            elif name.endswith(".bias"):
                torch.nn.init.normal_(p, mean=0.0, std=0.3)
    return model.eval()


def save(model: torch.nn.Module, path: str | Path) -> Path:
    """HF save_pretrained into `path` (created); returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return path


def torch_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    """float32 logits `[B, T, V]` of HF `model` for int tokens `[B, T]` (no padding)."""
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long))
    return out.logits.float().numpy()


def random_tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length), dtype=np.int32)


def _forward(graphdef, params, tokens, positions, segment_ids):
    from flax import nnx
    return nnx.merge(graphdef, params)(tokens, positions, segment_ids)


_jit_forward = None


def jit_logits(model, tokens, positions=None, segment_ids=None):
    """`model(tokens, positions, segment_ids)` as one jitted program (eager op-by-op dispatch
    compiles every primitive per shape, which is slow on CPU)."""
    global _jit_forward
    import jax
    from flax import nnx
    if _jit_forward is None:
        _jit_forward = jax.jit(_forward, static_argnums=0)
    graphdef, params = nnx.split(model, nnx.Param)
    return _jit_forward(graphdef, params, tokens, positions, segment_ids)
