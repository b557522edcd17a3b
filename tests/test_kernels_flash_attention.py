"""`clawjax.kernels.flash_attention` (the Pallas GPU flash kernel, in Pallas' interpreter here)
against the XLA attention it replaces, `clawjax.model.attention.attend` on the packed mask
(causal & same segment): outputs and q/k/v gradients, GQA, padding (segment 0), float32 and
bfloat16; then the whole model with `attention="pallas_gpu"` against `"xla"`.

Tolerances: float32 1e-5 on outputs and 1e-4 on gradients (the kernel sums keys block by
block, the reference in one pass); bfloat16 3e-2 (one bf16 rounding of the probabilities)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clawjax import config as trainer_config
from clawjax import model as cm
from clawjax.kernels.flash_attention import block_size, segment_flash_attention
from clawjax.model.attention import attend
from clawjax.model.config import ATTENTION_IMPLEMENTATIONS


def packed(b: int, t: int, n: int, k: int, h: int, dtype, seed: int = 0):
    """q/k/v and segment ids of `b` rows: row 0 holds two samples and padding, row 1 one
    sample filling it."""
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, n, h), dtype)
    kk = jax.random.normal(keys[1], (b, t, k, h), dtype)
    v = jax.random.normal(keys[2], (b, t, k, h), dtype)
    seg = np.zeros((b, t), np.int32)
    seg[0, : t // 3] = 1
    seg[0, t // 3: 3 * t // 4] = 2
    seg[1:, :] = 1
    return q, kk, v, jnp.asarray(seg)


def reference_mask(seg: jax.Array) -> jax.Array:
    idx = jnp.arange(seg.shape[1])
    return (idx[None, :, None] >= idx[None, None, :]) & (seg[:, :, None] == seg[:, None, :])


@pytest.mark.parametrize("dtype,out_tol,grad_tol", [(jnp.float32, 1e-5, 1e-4),
                                                   (jnp.bfloat16, 3e-2, 6e-2)],
                         ids=["f32", "bf16"])
def test_equals_the_xla_attention_with_gradients(dtype, out_tol, grad_tol):
    q, k, v, seg = packed(2, 96, 4, 2, 32, dtype)
    mask = reference_mask(seg)
    weights = jnp.cos(jnp.arange(32.0))  # a loss that weighs every output dimension

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)

    flash = lambda q, k, v: segment_flash_attention(q, k, v, seg, interpret=True)
    xla = lambda q, k, v: attend(q, k, v, mask)
    out_flash, out_xla = flash(q, k, v), xla(q, k, v)
    assert out_flash.dtype == dtype and out_flash.shape == q.shape
    np.testing.assert_allclose(np.asarray(out_flash, np.float32), np.asarray(out_xla, np.float32),
                               atol=out_tol, rtol=out_tol)
    grads_flash = jax.grad(loss(flash), argnums=(0, 1, 2))(q, k, v)
    grads_xla = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", grads_flash, grads_xla):
        assert a.shape == b.shape, name
        scale = max(1.0, float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
        np.testing.assert_allclose(np.asarray(a, np.float32) / scale,
                                   np.asarray(b, np.float32) / scale, atol=grad_tol,
                                   err_msg=f"d{name}")


def test_segments_never_see_each_other():
    """Changing the second sample of row 0 leaves the first sample's outputs unchanged."""
    q, k, v, seg = packed(2, 48, 2, 1, 16, jnp.float32, seed=3)
    out = segment_flash_attention(q, k, v, seg, interpret=True)
    later = (seg == 2)[:, :, None, None]
    out2 = segment_flash_attention(q, jnp.where(later, 5.0, k), jnp.where(later, -3.0, v), seg,
                                   interpret=True)
    first = np.asarray(seg[0] == 1)
    np.testing.assert_array_equal(np.asarray(out)[0, first], np.asarray(out2)[0, first])
    assert not np.allclose(np.asarray(out)[0, seg[0] == 2], np.asarray(out2)[0, seg[0] == 2])


def test_bad_shapes_name_what_was_expected():
    q, k, v, seg = packed(1, 40, 4, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="T=40: expected a multiple of 16"):
        segment_flash_attention(q, k, v, seg, interpret=True)
    q, k, v, seg = packed(1, 32, 4, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"segment_ids \(1, 31\)"):
        segment_flash_attention(q, k, v, seg[:, :31], interpret=True)
    with pytest.raises(ValueError, match="K dividing N"):
        segment_flash_attention(q, k[:, :, :1], v, seg, interpret=True)
    assert [block_size(t) for t in (256, 96, 32, 48)] == [128, 32, 32, 16]


def test_the_model_with_the_kernel_equals_the_xla_model():
    """Transformer.hidden with attention="pallas_gpu" (interpreted off a GPU) on packed rows,
    value and parameter gradients, against attention="xla" (float32, 1e-5 / 1e-4)."""
    from flax import nnx

    config = cm.ModelConfig.from_hf(dict(trainer_config.TINY_QWEN3, vocab_size=64))
    model = cm.init_random(config, seed=1)
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 32)), jnp.int32)
    seg = np.ones((2, 32), np.int32)
    seg[0, 12:28], seg[0, 28:] = 2, 0
    positions = np.concatenate([np.arange(12), np.arange(16), np.zeros(4, int)])
    positions = jnp.asarray(np.stack([positions, np.arange(32)]), jnp.int32)

    def loss(params, attention):
        m = nnx.merge(graphdef, params)
        m.config = m.config.replace(attention=attention)
        h = m.hidden(tokens, positions, jnp.asarray(seg)).astype(jnp.float32)
        return jnp.sum(h * jnp.sin(jnp.arange(h.shape[-1])))

    value_xla, grads_xla = jax.value_and_grad(loss)(params, "xla")
    value_kernel, grads_kernel = jax.value_and_grad(loss)(params, "pallas_gpu")
    np.testing.assert_allclose(float(value_kernel), float(value_xla), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_kernel), jax.tree.leaves(grads_xla)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_config_names_agree_and_unknown_names_fail():
    assert trainer_config.ATTENTION_IMPLEMENTATIONS == ATTENTION_IMPLEMENTATIONS
    with pytest.raises(cm.ConfigError, match="attention='flash'"):
        cm.ModelConfig.from_hf(dict(trainer_config.TINY_QWEN3)).replace(attention="flash")
