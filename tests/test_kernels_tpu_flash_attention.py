"""`clawjax.kernels.tpu_flash_attention` (the Pallas TPU flash kernel, in Pallas' TPU interpreter
here) against the XLA attention it replaces, `clawjax.model.attention.attend` on the packed mask
(causal & same segment): outputs and q/k/v gradients under jit, GQA, padding (segment 0),
float32 and bfloat16; then the whole model with `attention="pallas_tpu"` against `"xla"`.

Tolerances: float32 1e-5 on outputs and 1e-4 on gradients (the kernel sums keys block by
block, the reference in one pass); bfloat16 3e-2 / 6e-2 (bf16 roundings of the probabilities).
The TPU interpreter is slow (seconds per call), so shapes are the smallest the kernel takes:
T = 128, one TPU lane width."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clawjax import config as trainer_config
from clawjax import model as cm
from clawjax.kernels.tpu_flash_attention import segment_flash_attention_tpu
from clawjax.model.attention import attend
from tests.test_kernels_flash_attention import packed, reference_mask


@pytest.mark.parametrize("dtype,out_tol,grad_tol", [(jnp.float32, 1e-5, 1e-4),
                                                   (jnp.bfloat16, 3e-2, 6e-2)],
                         ids=["f32", "bf16"])
def test_equals_the_xla_attention_with_gradients(dtype, out_tol, grad_tol):
    q, k, v, seg = packed(2, 128, 4, 2, 16, dtype)
    mask = reference_mask(seg)
    weights = jnp.cos(jnp.arange(16.0))  # a loss that weighs every output dimension

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)

    flash = lambda q, k, v: segment_flash_attention_tpu(q, k, v, seg, interpret=True)  # noqa: E731
    xla = lambda q, k, v: attend(q, k, v, mask)  # noqa: E731
    out_flash, out_xla = jax.jit(flash)(q, k, v), xla(q, k, v)
    assert out_flash.dtype == dtype and out_flash.shape == q.shape
    np.testing.assert_allclose(np.asarray(out_flash, np.float32), np.asarray(out_xla, np.float32),
                               atol=out_tol, rtol=out_tol)
    # Under jit, as in the train step: the backward kernels are built after the forward
    # returned, and must still be interpreted off a TPU.
    grads_flash = jax.jit(jax.grad(loss(flash), argnums=(0, 1, 2)))(q, k, v)
    grads_xla = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", grads_flash, grads_xla):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        scale = max(1.0, float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
        np.testing.assert_allclose(np.asarray(a, np.float32) / scale,
                                   np.asarray(b, np.float32) / scale, atol=grad_tol,
                                   err_msg=f"d{name}")


def test_segments_never_see_each_other():
    """Changing the second sample of row 0 leaves the first sample's outputs unchanged."""
    q, k, v, seg = packed(2, 128, 2, 1, 16, jnp.float32, seed=3)
    out = segment_flash_attention_tpu(q, k, v, seg, interpret=True)
    later = (seg == 2)[:, :, None, None]
    out2 = segment_flash_attention_tpu(q, jnp.where(later, 5.0, k), jnp.where(later, -3.0, v),
                                       seg, interpret=True)
    first = np.asarray(seg[0] == 1)
    np.testing.assert_array_equal(np.asarray(out)[0, first], np.asarray(out2)[0, first])
    assert not np.allclose(np.asarray(out)[0, seg[0] == 2], np.asarray(out2)[0, seg[0] == 2])


def test_bad_shapes_name_what_was_expected():
    q, k, v, seg = packed(1, 96, 4, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="T=96: expected a multiple of 128"):
        segment_flash_attention_tpu(q, k, v, seg, interpret=True)
    q, k, v, seg = packed(1, 128, 4, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"segment_ids \(1, 127\)"):
        segment_flash_attention_tpu(q, k, v, seg[:, :127], interpret=True)
    with pytest.raises(ValueError, match="K dividing N"):
        segment_flash_attention_tpu(q, k[:, :, :1], v, seg, interpret=True)


def test_the_model_with_the_kernel_equals_the_xla_model():
    """Transformer.hidden with attention="pallas_tpu" (interpreted off a TPU) on packed rows,
    value and parameter gradients under jit, against attention="xla" (float32, 1e-5 / 1e-4)."""
    from flax import nnx

    config = cm.ModelConfig.from_hf(dict(trainer_config.TINY_QWEN3, vocab_size=64,
                                         num_hidden_layers=1))
    model = cm.init_random(config, seed=1)
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (1, 128)), jnp.int32)
    seg = np.ones((1, 128), np.int32)
    seg[0, 50:110], seg[0, 110:] = 2, 0
    positions = jnp.asarray(np.concatenate([np.arange(50), np.arange(60), np.zeros(18, int)]
                                           )[None], jnp.int32)

    def loss(params, attention):
        m = nnx.merge(graphdef, params)
        m.config = m.config.replace(attention=attention)
        h = m.hidden(tokens, positions, jnp.asarray(seg)).astype(jnp.float32)
        return jnp.sum(h * jnp.sin(jnp.arange(h.shape[-1])))

    value_xla, grads_xla = jax.value_and_grad(loss)(params, "xla")
    value_kernel, grads_kernel = jax.jit(jax.value_and_grad(loss), static_argnums=1)(
        params, "pallas_tpu")
    np.testing.assert_allclose(float(value_kernel), float(value_xla), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_kernel), jax.tree.leaves(grads_xla)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_config_row_multiples_match_the_kernels_smallest_blocks():
    """`clawjax.config` keeps its own copy (importing the kernels would load JAX for --help);
    a token budget the kernel cannot split is refused when the config is validated."""
    from clawjax.kernels.flash_attention import BLOCK_CHOICES
    from clawjax.kernels.tpu_flash_attention import TPU_BLOCK_CHOICES

    assert trainer_config.ATTENTION_ROW_MULTIPLE == {
        "xla": 1, "pallas_gpu": BLOCK_CHOICES[-1], "pallas_tpu": TPU_BLOCK_CHOICES[-1]}
    assert set(trainer_config.ATTENTION_ROW_MULTIPLE) == set(trainer_config.ATTENTION_IMPLEMENTATIONS)
    c = trainer_config.base_config()
    c.model.attention, c.trainer.token_budget = "pallas_tpu", 1000
    with pytest.raises(trainer_config.ConfigError, match="trainer.token_budget.*1000.*a multiple "
                                                         "of 128 with model.attention = 'pallas_tpu'"):
        trainer_config.validate(c)
    c.trainer.token_budget = 1024
    trainer_config.validate(c)
