"""The trainer's functional use of the model: split params, merge inside jit, grad, remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import hf_tiny
from clawjax import model as cm


def test_functional_split_merge_jit_and_grad():
    """The trainer's usage: split params, merge inside jit, differentiate w.r.t. params; with
    remat the gradients are the same."""
    config = cm.ModelConfig.from_hf(hf_tiny.hf_config("qwen3").to_dict())
    model = cm.init_random(config, seed=6)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = hf_tiny.random_tokens(2, 10, seed=5)

    def loss(params, remat=False):
        m = nnx.merge(graphdef, params)
        if remat:
            m.config = m.config.replace(remat=True)
        h = m.hidden(tokens, None, None)
        return jnp.mean(jax.nn.logsumexp(h.astype(jnp.float32) @ m.lm_head().astype(jnp.float32), -1))

    jloss = jax.jit(loss)
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(float(value), float(jloss(params)), rtol=1e-6)
    _, grads_remat = jax.jit(jax.value_and_grad(lambda p: loss(p, remat=True)))(params)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6, rtol=1e-5)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    # central finite difference along the normalised gradient direction
    direction = jax.tree.map(lambda g: g / (jnp.linalg.norm(jnp.ravel(g)) + 1e-12), grads)
    eps = 1e-3
    plus = jloss(jax.tree.map(lambda p, d: p + eps * d, params, direction))
    minus = jloss(jax.tree.map(lambda p, d: p - eps * d, params, direction))
    fd = (float(plus) - float(minus)) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(fd, analytic, rtol=2e-2)
