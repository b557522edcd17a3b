"""`clawjax.model.kernel_attention`: a Pallas attention kernel runs shard by shard on a
multi-device mesh (8 fake CPU devices, mesh data 2 × fsdp 2 × tensor 2): each device sees only
its rows and heads, the result equals the XLA attention on the whole batch, and the model with
`attention="pallas_gpu"` (interpreted here) on that mesh equals `attention="xla"`.
Tolerances as in tests/test_kernels_flash_attention.py (float32: 1e-5 values, 1e-4 gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from clawjax import config as trainer_config
from clawjax import model as cm
from clawjax import sharding
from clawjax.model import kernel_attention as ka
from clawjax.model.attention import attend
from tests.test_kernels_flash_attention import reference_mask


def _packed(b: int, t: int, n: int, k: int, h: int, seed: int = 0):
    """q/k/v and segment ids: every row holds two samples and some padding, split differently."""
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    kk = jax.random.normal(keys[1], (b, t, k, h))
    v = jax.random.normal(keys[2], (b, t, k, h))
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        cut, end = 3 + 2 * r, t - 2 - r
        seg[r, :cut], seg[r, cut:end] = 1, 2
    return q, kk, v, jnp.asarray(seg)


def _place(mesh, q, k, v, seg):
    """The operands with the layouts the trainer gives them (batch rows over data × fsdp,
    heads over tensor)."""
    put = lambda x, axes: jax.device_put(  # noqa: E731
        x, NamedSharding(mesh, sharding.logical_spec(axes)))
    return (put(q, ("batch", "seq", "heads", "head_dim")),
            put(k, ("batch", "seq", "kv_heads", "head_dim")),
            put(v, ("batch", "seq", "kv_heads", "head_dim")), put(seg, ("batch", "seq")))


def test_each_device_runs_the_kernel_on_its_own_rows_and_heads(monkeypatch):
    """A recording kernel (the XLA attention on the mask the segment ids give) sees blocks of
    1 row (4 rows / data 2 × fsdp 2) and 2 of 4 query heads with 1 of 2 kv heads (tensor 2);
    the assembled output equals the unsharded attention, so every query head kept its kv head."""
    seen = []

    def recording_kernel(q, k, v, segment_ids):
        seen.append((q.shape, k.shape, v.shape, segment_ids.shape))
        return attend(q, k, v, reference_mask(segment_ids))

    monkeypatch.setattr(ka, "_kernel", lambda implementation: recording_kernel)
    mesh = sharding.make_mesh(2, 2, 2)
    q, k, v, seg = _packed(4, 16, 4, 2, 8)
    out = jax.jit(lambda *a: ka.kernel_attention(*a, "pallas_gpu", mesh))(*_place(mesh, q, k, v, seg))
    assert seen == [((1, 16, 2, 8), (1, 16, 1, 8), (1, 16, 1, 8), (1, 16))]
    np.testing.assert_allclose(np.asarray(out), np.asarray(attend(q, k, v, reference_mask(seg))),
                               atol=1e-6)
    # One device: the kernel sees the whole batch, no shard_map.
    seen.clear()
    ka.kernel_attention(q, k, v, seg, "pallas_gpu", sharding.single_device_mesh())
    assert seen == [((4, 16, 4, 8), (4, 16, 2, 8), (4, 16, 2, 8), (4, 16))]


def test_shapes_that_do_not_split_over_the_mesh_and_unknown_kernels_are_named():
    mesh = sharding.make_mesh(2, 2, 2)
    q, k, v, seg = _packed(2, 16, 4, 2, 8)
    with pytest.raises(ValueError, match=r"kernel_attention q: dimension 0 \(batch\) has size 2, "
                                         r"not divisible by mesh axis dataxfsdp of size 4"):
        ka.kernel_attention(q, k, v, seg, "pallas_gpu", mesh)
    with pytest.raises(ValueError, match="implementation='flash'"):
        ka.kernel_attention(q, k, v, seg, "flash")


def test_the_sharded_model_with_the_gpu_kernel_equals_the_xla_model():
    """Transformer.hidden on the 2 × 2 × 2 mesh, attention="pallas_gpu" (the real kernel, in
    Pallas' interpreter, per shard) against attention="xla": value and parameter gradients."""
    from flax import nnx

    mesh = sharding.make_mesh(2, 2, 2)
    config = cm.ModelConfig.from_hf(dict(trainer_config.TINY_QWEN3, vocab_size=64))
    model = cm.init_random(config, seed=1, mesh=mesh)
    assert model.mesh is mesh
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (4, 32)), jnp.int32)
    _, _, _, seg = _packed(4, 32, 1, 1, 1)
    positions = jnp.asarray(np.where(np.asarray(seg) == 2,
                                     np.arange(32) - np.argmax(np.asarray(seg) == 2, axis=1)[:, None],
                                     np.arange(32)), jnp.int32)
    rows = NamedSharding(mesh, sharding.logical_spec(("batch", "seq")))
    tokens, positions, seg = (jax.device_put(x, rows) for x in (tokens, positions, seg))

    def loss(params, attention):
        m = nnx.merge(graphdef, params)
        m.config = m.config.replace(attention=attention)
        h = m.hidden(tokens, positions, seg).astype(jnp.float32)
        return jnp.sum(h * jnp.sin(jnp.arange(h.shape[-1])))

    step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    value_xla, grads_xla = step(params, "xla")
    value_kernel, grads_kernel = step(params, "pallas_gpu")
    np.testing.assert_allclose(float(value_kernel), float(value_xla), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_kernel), jax.tree.leaves(grads_xla)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
