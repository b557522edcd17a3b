"""`Transformer`: the decoder-only policy (Qwen3 / Qwen2 / Llama 3) as an `nnx.Module`.

Params (logical axes in brackets):
  embedding `[V, D]` (vocab, embed); layers[i]: Block; final_norm.scale `[D]`;
  lm_head_kernel `[D, V]` (embed, vocab) only when the embeddings are untied.
Compute runs in the parameter dtype; attention softmax and RMSNorm statistics in float32;
logits are float32: `logits == hidden.astype(f32) @ lm_head().astype(f32)`.

Functional use (trainer): `graphdef, params = nnx.split(model, nnx.Param)`, then inside jit
`nnx.merge(graphdef, params).hidden(...)`; `jax.grad` w.r.t. `params` works.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clawjax.model.cache import KVCache, cache_mask_and_slots, init_cache
from clawjax.model.config import ModelConfig, rope_inv_freq
from clawjax.model.layers import INIT_STD, RMSNorm, param, rope_cos_sin
from clawjax.model.modules import Block


def _block_forward(block: Block, h, cos, sin, mask, segment_ids, attention: str, mesh):
    return block(h, cos, sin, mask, segment_ids, attention, mesh)


def _block_forward_remat(block: Block, h, cos, sin, mask, segment_ids, attention: str, mesh):
    """`_block_forward` whose activations are recomputed in the backward pass. The block enters
    `jax.checkpoint` as a pure (graphdef, state) pair: nothing is written back to the module, so
    it also works when the model was merged inside another transform (the trainer's `lax.scan`
    over micro-batches), where `nnx.remat`'s write-back fails with a trace-level error."""
    graphdef, state = nnx.split(block)

    def run(state, h, cos, sin, mask, segment_ids):
        return nnx.merge(graphdef, state)(h, cos, sin, mask, segment_ids, attention, mesh)

    return jax.checkpoint(run)(state, h, cos, sin, mask, segment_ids)


class Transformer(nnx.Module):
    """Decoder. `model(tokens [B,T] int32, positions=None, segment_ids=None) -> [B,T,V] f32`.

    Packed rows: segment ids 1..n per row, 0 = padding; attention never crosses segments;
    positions restart at 0 in each segment. Defaults: positions = arange(T), segment_ids = 1.
    `mesh` (static, None = one device) is where the parameters live: a Pallas attention kernel
    (`config.attention` "pallas_gpu" / "pallas_tpu") runs shard by shard on it.
    """

    def __init__(self, config: ModelConfig, dtype=jnp.float32, *, rngs: nnx.Rngs,
                 mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh
        self.embedding = param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([Block(config, dtype, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head_kernel = param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), dtype)

    # --- public API -----------------------------------------------------------------------------
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Logits `[B,T,V]` float32."""
        h = self.hidden(tokens, positions, segment_ids)
        return self.logits(h)

    def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden states `[B,T,D]` in the parameter dtype."""
        tokens, positions, segment_ids = _check_inputs(tokens, positions, segment_ids)
        t = tokens.shape[1]
        idx = jnp.arange(t)
        causal = idx[None, :, None] >= idx[None, None, :]  # [1,T,S]
        mask = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])  # [B,T,S]
        cos, sin = rope_cos_sin(positions, jnp.asarray(rope_inv_freq(self.config)), self.dtype)
        h = self.embed(tokens)
        forward = _block_forward_remat if self.config.remat else _block_forward
        for block in self.layers:
            h = forward(block, h, cos, sin, mask, segment_ids, self.config.attention, self.mesh)
        return self.final_norm(h)

    def lm_head(self) -> jax.Array:
        """The LM-head matrix `[D, V]` (the embedding transposed when tied)."""
        if self.config.tie_word_embeddings:
            return self.embedding[...].T
        return self.lm_head_kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden `[B,T,D]` → logits `[B,T,V]` float32 (product in float32)."""
        return jnp.einsum("BTD,DV->BTV", hidden.astype(jnp.float32), self.lm_head().astype(jnp.float32))

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings `[B,T,D]`."""
        return jnp.take(self.embedding[...], tokens, axis=0)

    # --- incremental decoding -------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """Empty KV cache `[layers, batch_size, max_len, kv_heads, head_dim]` (default: param dtype)."""
        c = self.config
        return init_cache(c.num_hidden_layers, batch_size, max_len, c.num_key_value_heads, c.head_dim,
                          dtype or self.dtype)

    def forward_cached(self, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                       window: int | None = None) -> tuple[jax.Array, KVCache]:
        """Logits `[B,T,V]` f32 for new tokens `[B,T]` at `positions` `[B,T]`, and the new cache.

        Token (b, t) with position p >= 0 writes its k/v at slot p of row b and attends slots
        0..p of row b (earlier calls' tokens and this call's). Position < 0 = padding: not
        written, logits garbage. Serves prefill (rows right-padded with -1) and decode (T=1).

        `window` (static, default the cache length S): attention reads only slots 0..W-1, so
        a step costs O(W) instead of O(S); every position must be < W (the caller's
        invariant: a larger one would attend a truncated history).
        """
        tokens = jnp.asarray(tokens, jnp.int32)
        positions = jnp.asarray(positions, jnp.int32)
        if tokens.ndim != 2 or positions.shape != tokens.shape:
            raise ValueError(f"forward_cached: tokens {tokens.shape} and positions {positions.shape} "
                             "must both be [B, T]")
        if cache.k.shape[1] != tokens.shape[0]:
            raise ValueError(f"forward_cached: cache batch {cache.k.shape[1]} != tokens batch {tokens.shape[0]}")
        if window is not None and not 0 < window <= cache.max_len:
            raise ValueError(f"forward_cached: window = {window}, expected 1..{cache.max_len} "
                             "(the cache length)")
        slots, mask = cache_mask_and_slots(positions, cache.max_len, window)
        cos, sin = rope_cos_sin(positions, jnp.asarray(rope_inv_freq(self.config)), self.dtype)
        h = self.embed(tokens)
        k_all, v_all = cache.k, cache.v
        for i, block in enumerate(self.layers):
            h, k_all, v_all = block.cached(h, cos, sin, slots, mask, k_all, v_all, layer=i)
        return self.logits(self.final_norm(h)), KVCache(k=k_all, v=v_all)


def _check_inputs(tokens, positions, segment_ids):
    """Validate/fill defaults: tokens `[B,T]` int32, positions = arange(T), segment_ids = 1."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens: expected an integer [B, T] array, got shape {tokens.shape} dtype {tokens.dtype}")
    tokens = tokens.astype(jnp.int32)
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
        if tuple(arr.shape) != (b, t):
            raise ValueError(f"{name}: expected shape {(b, t)} like tokens, got {tuple(arr.shape)}")
    return tokens, jnp.asarray(positions, jnp.int32), jnp.asarray(segment_ids, jnp.int32)


def abstract_model(config: ModelConfig, dtype=jnp.float32, mesh=None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) without allocating: params are `jax.ShapeDtypeStruct`s carrying their
    NamedSharding on `mesh` (1×1×1 on the first device when None) — e.g. an orbax restore
    target. `nnx.merge(graphdef, concrete_params)` builds the model. The traced structure is
    cached per (config, dtype, mesh) and each call gets its own `params` state: tracing the
    constructor costs ~20 ms of Python for the tiny default model (more with more layers),
    which a serving process would otherwise pay, holding the GIL, on every weight update."""
    from clawjax import sharding  # local: sharding imports nothing from the model at import time

    mesh = mesh if mesh is not None else sharding.single_device_mesh()
    graphdef, params = _abstract_model(config, dtype, mesh)
    # New Variable objects around the cached (immutable) shape structs: a caller may mutate its
    # state without touching the cache.
    return graphdef, nnx.from_flat_state([(path, var.replace(var.get_value()))
                                          for path, var in nnx.to_flat_state(params)])


@functools.lru_cache(maxsize=16)
def _abstract_model(config: ModelConfig, dtype, mesh) -> tuple[nnx.GraphDef, nnx.State]:
    from clawjax import sharding

    abstract = nnx.eval_shape(lambda: Transformer(config, dtype, rngs=nnx.Rngs(0), mesh=mesh))
    graphdef, params = nnx.split(abstract, nnx.Param)
    shardings = sharding.param_shardings(params, mesh)
    params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), params, shardings)
    return graphdef, params


def init_random(config: ModelConfig, seed: int, dtype=jnp.float32, mesh=None) -> Transformer:
    """A randomly initialised model (matrices N(0, INIT_STD), norm scales 1, biases 0).

    Each parameter is drawn on the host (numpy, float32, in parameter-path order, so values do
    not depend on the mesh) and placed shard by shard on `mesh` (1×1×1 on the first device
    when None) with its sharding: no device ever holds an unsharded copy. Host draws avoid
    compiling a random-init program per config, which dominates for tiny test models.
    """
    graphdef, abstract = abstract_model(config, dtype, mesh)
    rng = np.random.default_rng(seed)
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        spec = var.get_value()
        kind = var.get_metadata().get("init", "normal")
        if kind == "normal":
            host = INIT_STD * rng.standard_normal(spec.shape, dtype=np.float32)
        else:
            host = np.full(spec.shape, 1.0 if kind == "ones" else 0.0, np.float32)
        host = host.astype(spec.dtype)
        value = jax.make_array_from_callback(spec.shape, spec.sharding, lambda idx, a=host: a[idx])
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
