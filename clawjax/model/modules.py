"""Decoder pieces: grouped-query attention, SwiGLU MLP and the pre-norm block.

Shape letters: B batch, T query tokens, S key tokens (T itself, or cache slots), D hidden,
N query heads, K kv heads, G = N / K heads per kv head, H head_dim, F mlp width.
Query head n uses kv head n // G (HF's `repeat_kv` order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clawjax.model.attention import attend, attend_causal
from clawjax.model.config import ModelConfig
from clawjax.model.kernel_attention import kernel_attention
from clawjax.model.layers import RMSNorm, apply_rope, param, project


class Attention(nnx.Module):
    """GQA self-attention with optional q/k/v/o bias and Qwen3 q/k RMSNorm (before rope)."""

    def __init__(self, config: ModelConfig, dtype, *, rngs: nnx.Rngs):
        d, n, k, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), dtype)
        self.k_proj = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.v_proj = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.o_proj = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), dtype)
        if config.qkv_bias:
            self.q_bias = param(rngs, (n, h), ("heads", "head_dim"), dtype, init="zeros")
            self.k_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.v_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, init="zeros")
        if config.o_bias:
            self.o_bias = param(rngs, (d,), ("embed",), dtype, init="zeros")
        if config.qk_norm:
            self.q_norm = RMSNorm(h, config.rms_norm_eps, dtype, rngs=rngs)
            self.k_norm = RMSNorm(h, config.rms_norm_eps, dtype, rngs=rngs)
        self.qkv_bias = config.qkv_bias
        self.has_o_bias = config.o_bias
        self.qk_norm = config.qk_norm

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x `[B,T,D]` → rotated q `[B,T,N,H]`, rotated k `[B,T,K,H]`, v `[B,T,K,H]`."""
        q = project(x, self.q_proj[...], 1)                  # [B,T,D] × [D,N,H] → [B,T,N,H]
        k = project(x, self.k_proj[...], 1)
        v = project(x, self.v_proj[...], 1)
        if self.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, o: jax.Array) -> jax.Array:
        """Attention output `[B,T,N,H]` → `[B,T,D]`."""
        y = project(o, self.o_proj[...], 2)                  # [B,T,N,H] × [N,H,D] → [B,T,D]
        return y + self.o_bias[...] if self.has_o_bias else y

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 segment_ids: jax.Array | None = None, implementation: str = "xla",
                 mesh: jax.sharding.Mesh | None = None) -> jax.Array:
        """Self-attention over the T tokens of `x` `[B,T,D]` with a causal mask `[B,T,T]`
        (every token may attend itself; upper key blocks are skipped, `attend_causal`).
        Implementations "pallas_gpu" and "pallas_tpu" compute the same from `segment_ids`
        `[B,T]` (mask = causal & same segment) with a flash kernel, shard by shard on `mesh`
        (`clawjax.model.kernel_attention`)."""
        q, k, v = self.qkv(x, cos, sin)
        if implementation != "xla":
            return self.out(kernel_attention(q, k, v, segment_ids, implementation, mesh))
        return self.out(attend_causal(q, k, v, mask))


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up)). gate/up `[D,F]`, down `[F,D]`."""

    def __init__(self, config: ModelConfig, dtype, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.up_proj = param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.down_proj = param(rngs, (f, d), ("mlp", "embed"), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = project(x, self.gate_proj[...], 1)
        up = project(x, self.up_proj[...], 1)
        return project(jax.nn.silu(gate) * up, self.down_proj[...], 1)


class Block(nnx.Module):
    """Pre-norm decoder block: h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, config: ModelConfig, dtype, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, rngs=rngs)
        self.attn = Attention(config, dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, rngs=rngs)
        self.mlp = MLP(config, dtype, rngs=rngs)

    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 segment_ids: jax.Array | None = None, attention: str = "xla",
                 mesh: jax.sharding.Mesh | None = None) -> jax.Array:
        h = h + self.attn(self.attn_norm(h), cos, sin, mask, segment_ids, attention, mesh)
        return h + self.mlp(self.mlp_norm(h))

    def cached(self, h: jax.Array, cos: jax.Array, sin: jax.Array, slots: jax.Array, mask: jax.Array,
               k_cache: jax.Array, v_cache: jax.Array, layer: int
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Block `layer` over new tokens h `[B,T,D]` against the whole cache k/v `[L,B,S,K,H]`.

        Each token's k/v is written at `[layer, b, slots[b, t]]` (slot S or beyond = not
        written), in place when the cache is donated: no per-layer copy of the cache. Queries
        attend the first W slots of the layer under `mask` `[B,T,W]`, W <= S (slots past W are
        neither read nor attended). Returns (h, k_cache, v_cache).
        """
        q, k, v = self.attn.qkv(self.attn_norm(h), cos, sin)
        rows = jnp.arange(h.shape[0])[:, None]
        k_cache = k_cache.at[layer, rows, slots].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[layer, rows, slots].set(v.astype(v_cache.dtype), mode="drop")
        window = mask.shape[-1]
        o = attend(q, k_cache[layer, :, :window].astype(q.dtype),
                   v_cache[layer, :, :window].astype(q.dtype), mask)
        h = h + self.attn.out(o)
        return h + self.mlp(self.mlp_norm(h)), k_cache, v_cache
