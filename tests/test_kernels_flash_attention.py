"""The Pallas flash-attention kernels, in Pallas' interpreters here, against the XLA attention
they replace, `clawjax.model.attention.attend` on the packed mask (causal & same segment):
`clawjax.kernels.flash_attention` (GPU, Triton) and `clawjax.kernels.tpu_flash_attention` (TPU,
Mosaic). Outputs and q/k/v gradients under jit, GQA, padding (segment 0), float32 and bfloat16;
then the whole model with `attention="pallas_gpu"` / `"pallas_tpu"` against `"xla"`.

Tolerances: float32 1e-5 on outputs and 1e-4 on gradients (the kernels sum keys block by
block, the reference in one pass); bfloat16 3e-2 / 6e-2 (bf16 roundings of the probabilities).
The TPU interpreter is slow (seconds per call), so its shapes are the smallest that kernel
takes: T = 128, one TPU lane width."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clawjax import config as trainer_config
from clawjax import model as cm
from clawjax.kernels.flash_attention import BLOCK_CHOICES, block_size, segment_flash_attention
from clawjax.kernels.tpu_flash_attention import TPU_BLOCK_CHOICES, segment_flash_attention_tpu
from clawjax.model.attention import attend
from clawjax.model.config import ATTENTION_IMPLEMENTATIONS

# (kernel, a row length T it takes): the GPU kernel at 96 (blocks of 32), the TPU one at 128.
KERNELS = [pytest.param(segment_flash_attention, 96, id="gpu"),
           pytest.param(segment_flash_attention_tpu, 128, id="tpu")]


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


@pytest.mark.parametrize("kernel,t", KERNELS)
@pytest.mark.parametrize("dtype,out_tol,grad_tol", [(jnp.float32, 1e-5, 1e-4),
                                                   (jnp.bfloat16, 3e-2, 6e-2)],
                         ids=["f32", "bf16"])
def test_equals_the_xla_attention_with_gradients(kernel, t, dtype, out_tol, grad_tol):
    q, k, v, seg = packed(2, t, 4, 2, 16, dtype)
    mask = reference_mask(seg)
    weights = jnp.cos(jnp.arange(16.0))  # a loss that weighs every output dimension

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)

    flash = lambda q, k, v: kernel(q, k, v, seg, interpret=True)  # noqa: E731
    xla = lambda q, k, v: attend(q, k, v, mask)  # noqa: E731
    out_flash, out_xla = jax.jit(flash)(q, k, v), xla(q, k, v)
    assert out_flash.dtype == dtype and out_flash.shape == q.shape
    np.testing.assert_allclose(np.asarray(out_flash, np.float32), np.asarray(out_xla, np.float32),
                               atol=out_tol, rtol=out_tol)
    # Under jit, as in the train step (the TPU kernel's backward is built after the forward
    # returned, and must still be interpreted off a TPU).
    grads_flash = jax.jit(jax.grad(loss(flash), argnums=(0, 1, 2)))(q, k, v)
    grads_xla = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", grads_flash, grads_xla):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        scale = max(1.0, float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
        np.testing.assert_allclose(np.asarray(a, np.float32) / scale,
                                   np.asarray(b, np.float32) / scale, atol=grad_tol,
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("kernel,t", KERNELS)
def test_segments_never_see_each_other(kernel, t):
    """Changing the second sample of row 0 leaves the first sample's outputs unchanged."""
    q, k, v, seg = packed(2, t, 2, 1, 16, jnp.float32, seed=3)
    out = kernel(q, k, v, seg, interpret=True)
    later = (seg == 2)[:, :, None, None]
    out2 = kernel(q, jnp.where(later, 5.0, k), jnp.where(later, -3.0, v), seg, interpret=True)
    first = np.asarray(seg[0] == 1)
    np.testing.assert_array_equal(np.asarray(out)[0, first], np.asarray(out2)[0, first])
    assert not np.allclose(np.asarray(out)[0, seg[0] == 2], np.asarray(out2)[0, seg[0] == 2])


@pytest.mark.parametrize("kernel,t,bad_t,multiple", [
    pytest.param(segment_flash_attention, 32, 40, 16, id="gpu"),
    pytest.param(segment_flash_attention_tpu, 128, 96, 128, id="tpu")])
def test_bad_shapes_name_what_was_expected(kernel, t, bad_t, multiple):
    q, k, v, seg = packed(1, bad_t, 4, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match=f"T={bad_t}: expected a multiple of {multiple}"):
        kernel(q, k, v, seg, interpret=True)
    q, k, v, seg = packed(1, t, 4, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match=rf"segment_ids \(1, {t - 1}\)"):
        kernel(q, k, v, seg[:, :t - 1], interpret=True)
    with pytest.raises(ValueError, match="K dividing N"):
        kernel(q, k[:, :, :1], v, seg, interpret=True)


def test_block_sizes():
    assert [block_size(t) for t in (256, 96, 32, 48)] == [128, 32, 32, 16]
    assert [block_size(t, TPU_BLOCK_CHOICES) for t in (1024, 768, 384)] == [512, 256, 128]


@pytest.mark.parametrize("attention,t,layers", [("pallas_gpu", 32, 2), ("pallas_tpu", 128, 1)])
def test_the_model_with_the_kernel_equals_the_xla_model(attention, t, layers):
    """Transformer.hidden with a kernel (interpreted off its accelerator) on packed rows, value
    and parameter gradients under jit, against attention="xla" (float32, 1e-5 / 1e-4)."""
    from flax import nnx

    config = cm.ModelConfig.from_hf(dict(trainer_config.TINY_QWEN3, vocab_size=64,
                                         num_hidden_layers=layers))
    model = cm.init_random(config, seed=1)
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (2, t)), jnp.int32)
    first, second = 3 * t // 8, 7 * t // 8  # row 0: two samples, then padding
    seg = np.ones((2, t), np.int32)
    seg[0, first:second], seg[0, second:] = 2, 0
    positions = np.concatenate([np.arange(first), np.arange(second - first),
                                np.zeros(t - second, int)])
    positions = jnp.asarray(np.stack([positions, np.arange(t)]), jnp.int32)

    def loss(params, attention):
        m = nnx.merge(graphdef, params)
        m.config = m.config.replace(attention=attention)
        h = m.hidden(tokens, positions, jnp.asarray(seg)).astype(jnp.float32)
        return jnp.sum(h * jnp.sin(jnp.arange(h.shape[-1])))

    step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    value_xla, grads_xla = step(params, "xla")
    value_kernel, grads_kernel = step(params, attention)
    np.testing.assert_allclose(float(value_kernel), float(value_xla), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_kernel), jax.tree.leaves(grads_xla)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_config_names_agree_and_unknown_names_fail():
    assert trainer_config.ATTENTION_IMPLEMENTATIONS == ATTENTION_IMPLEMENTATIONS
    with pytest.raises(cm.ConfigError, match="attention='flash'"):
        cm.ModelConfig.from_hf(dict(trainer_config.TINY_QWEN3)).replace(attention="flash")


def test_config_row_multiples_match_the_kernels_smallest_blocks():
    """`clawjax.config` keeps its own copy (importing the kernels would load JAX for --help);
    a token budget the kernel cannot split is refused when the config is validated."""
    assert trainer_config.ATTENTION_ROW_MULTIPLE == {
        "xla": 1, "pallas_gpu": BLOCK_CHOICES[-1], "pallas_tpu": TPU_BLOCK_CHOICES[-1]}
    assert set(trainer_config.ATTENTION_ROW_MULTIPLE) == set(ATTENTION_IMPLEMENTATIONS)
    c = trainer_config.base_config()
    c.model.attention, c.trainer.token_budget = "pallas_tpu", 1000
    with pytest.raises(trainer_config.ConfigError, match="trainer.token_budget.*1000.*a multiple "
                                                         "of 128 with model.attention = 'pallas_tpu'"):
        trainer_config.validate(c)
    c.trainer.token_budget = 1024
    trainer_config.validate(c)
