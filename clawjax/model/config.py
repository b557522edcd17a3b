"""`ModelConfig`: the decoder's hyper-parameters, read from and written to HF `config.json`.

Supported architectures (`SUPPORTED_MODEL_TYPES`):
  - `qwen3`: q/k RMSNorm over `head_dim`, `head_dim` decoupled from `hidden_size / heads`,
    optional bias on q/k/v/o (`attention_bias`).
  - `qwen2`: bias on q/k/v (always), none on o.
  - `llama`: Llama 3 incl. `rope_type='llama3'` frequency scaling; optional q/k/v/o bias.
Rope parameters are read from transformers 5's `rope_parameters` or the older
`rope_theta` + `rope_scaling` pair; rope types `default` and `llama3` are supported.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from clawjax.model.errors import ConfigError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
ATTENTION_IMPLEMENTATIONS = ("xla", "pallas_gpu", "pallas_tpu")  # ModelConfig.attention
_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}

# Keys of config.json that ModelConfig models itself (everything else goes to `extra`).
_MODELED = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias",
    "max_position_embeddings", "hidden_act", "architectures", "torch_dtype", "dtype",
    "transformers_version", "use_sliding_window", "mlp_bias", "layer_types", "sliding_window",
    "max_window_layers",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one decoder. Immutable and hashable (it lives in the NNX graphdef).

    `rope_scaling` is None for plain rope, else a dict with `rope_type` and its parameters
    (never `rope_theta`, which has its own field). `extra` keeps config.json keys the model does
    not use (token ids, ...) so `to_hf()` round-trips them. `remat` (not an HF key) recomputes
    each decoder block in the backward pass to trade compute for activation memory in training.
    `attention` (not an HF key) picks the training forward's self-attention: "xla" (the
    `clawjax.model.attention` einsums, any backend), "pallas_gpu" (`clawjax.kernels
    .flash_attention`, a flash kernel for GPUs) or "pallas_tpu" (`clawjax.kernels
    .tpu_flash_attention`, one for TPUs): the same function, no `[T,S]` scores in memory.
    Decoding with a KV cache always uses the XLA path.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    remat: bool = False
    attention: str = "xla"
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type={self.model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name}={value!r}: expected a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim}: expected an even number (rope rotates pairs)")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"config field attention={self.attention!r}: expected one of "
                              f"{list(ATTENTION_IMPLEMENTATIONS)}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope_type={rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}")

    def __hash__(self) -> int:
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    # --- derived ------------------------------------------------------------------------------
    @property
    def qkv_bias(self) -> bool:
        """Whether q/k/v projections carry a bias (Qwen2 always does)."""
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        """Whether the attention output projection carries a bias (never for Qwen2)."""
        return self.model_type != "qwen2" and self.attention_bias

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # --- HF config.json -----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Build from an HF config.json dict (transformers 4 or 5 spelling)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a dict (parsed config.json), got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type={model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in d:
                raise ConfigError(f"config.json has no {key!r} (required for model_type={model_type!r})")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported; expected 'silu' (SwiGLU)")
        if d.get("mlp_bias"):
            raise ConfigError("mlp_bias=True is not supported; expected false")
        if d.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=True is not supported; expected false")
        rope_theta, rope_scaling = _read_rope(d)
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            extra={k: v for k, v in d.items() if k not in _MODELED},
        )

    def to_hf(self, dtype: str | None = None) -> dict:
        """config.json dict that transformers (4.x and 5.x) loads as is."""
        rope_parameters = {"rope_theta": self.rope_theta, "rope_type": "default"}
        rope_parameters.update(self.rope_scaling or {})
        d = dict(self.extra)
        d.update(
            architectures=[_ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
            rope_parameters=rope_parameters,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
        )
        if self.model_type != "qwen2":
            d["attention_bias"] = self.attention_bias
        if dtype is not None:
            d["dtype"] = dtype
            d["torch_dtype"] = dtype
        return d


def _read_rope(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling without theta or None) from either HF spelling."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"rope_parameters/rope_scaling={params!r}: expected a dict or null")
    params = dict(params)
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope_type={rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in need if k not in params]
    if missing:
        raise ConfigError(f"rope_type='llama3' needs {list(need)}; missing {missing}")
    return theta, {"rope_type": rope_type, **{k: params[k] for k in need}}


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse rope frequencies `[head_dim // 2]` float32, with llama3 scaling when configured.

    Computed in float32 in the same order as transformers so positions rotate identically.
    """
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    scaling = config.rope_scaling
    if not scaling or scaling.get("rope_type") == "default":
        return inv_freq
    factor = np.float32(scaling["factor"])
    low, high = np.float32(scaling["low_freq_factor"]), np.float32(scaling["high_freq_factor"])
    old_len = np.float32(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
