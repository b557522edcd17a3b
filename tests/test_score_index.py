"""Scored positions: `with_score_index` lists the loss-masked positions per row, and the LM head
evaluated only there (`sequence_logp_at`, the trainer's path) gives the full path's log-probs,
entropy, top-K log-probs, loss and update."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clawjax import batch as batch_lib
from clawjax import logprobs
from sample_factory import make_samples


def _batch(n=10, seed=0, budget=64):
    return batch_lib.pack(make_samples(n, seed=seed), budget, row_buckets=(8,))[0]


def test_index_lists_the_scored_positions_of_each_row():
    b = batch_lib.with_score_index(_batch())
    mask = (b.loss_mask > 0) & (b.segment_ids > 0)
    for r in range(mask.shape[0]):
        want = np.flatnonzero(mask[r])
        got = b.score_index[r]
        assert list(got[:len(want)]) == list(want) and not got[len(want):].any()
    assert b.score_index.shape[1] % (64 // batch_lib.SCORE_STEPS) == 0
    assert b.score_index.shape[1] >= mask.sum(-1).max()
    assert 0 not in set(np.flatnonzero(mask[:, 0]))  # position 0 is never scored


def test_capacity_rounds_up_in_steps_and_refuses_too_small():
    mask = np.zeros((3, 256), np.float32)
    mask[1, 10:110] = 1                         # 100 scored → 128 (steps of 32)
    assert batch_lib.score_capacity(mask) == 128
    assert batch_lib.score_capacity(np.zeros((2, 256))) == 32
    mask[0, 1:] = 1
    assert batch_lib.score_capacity(mask) == 256
    with pytest.raises(ValueError, match="capacity = 8"):
        batch_lib.with_score_index(_batch(), capacity=8)


@pytest.mark.parametrize("with_topk", [False, True])
def test_sequence_logp_at_equals_the_full_path(with_topk):
    b = batch_lib.with_score_index(_batch(seed=3))
    rng = np.random.default_rng(0)
    r, l = b.tokens.shape
    hidden = jnp.asarray(rng.normal(size=(r, l, 16)), jnp.float32)
    lm_head = jnp.asarray(rng.normal(size=(16, 512)) * 0.3, jnp.float32)
    topk = jnp.asarray(rng.integers(0, 512, size=(r, l, 3)), jnp.int32) if with_topk else None
    mask = jnp.asarray((b.loss_mask > 0) & (b.segment_ids > 0))
    w = jnp.asarray(rng.normal(size=(r, l)), jnp.float32)

    def full(h, wh):
        if topk is None:
            lp, ent = logprobs.sequence_logp_and_entropy(h, wh, b.tokens, b.segment_ids, 128)
            return lp, ent, None
        return logprobs.sequence_logp_entropy_topk(h, wh, b.tokens, b.segment_ids, topk, 128)

    def at(h, wh):
        return logprobs.sequence_logp_at(h, wh, b.tokens, b.segment_ids, b.score_index, 128,
                                         topk_ids=topk)

    def loss(fn):
        def f(h, wh):
            lp, ent, tk = fn(h, wh)
            total = jnp.sum(jnp.where(mask, lp * w + 0.1 * ent, 0.0))
            if tk is not None:
                total += jnp.sum(jnp.where(mask[..., None], tk, 0.0))
            return total
        return f

    got, want = at(hidden, lm_head), full(hidden, lm_head)
    for g, x in zip(got, want):
        if x is None:
            assert g is None
            continue
        m = mask if g.ndim == 2 else mask[..., None]
        np.testing.assert_allclose(np.where(m, g, 0), np.where(m, x, 0), atol=2e-6)
        assert not np.asarray(jnp.where(m, 0.0, g)).any()          # 0 off the scored positions
    g_at = jax.grad(loss(at), argnums=(0, 1))(hidden, lm_head)
    g_full = jax.grad(loss(full), argnums=(0, 1))(hidden, lm_head)
    for a, x in zip(g_at, g_full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(x), atol=2e-5)


def test_train_step_with_index_equals_step_without(tmp_path):
    """The trainer's update on the scored positions equals the all-positions update."""
    from clawjax import trainer
    from test_trainer import tiny_config
    from clawjax.loop import TrainLoop
    from clawjax.sources import QueueSource

    # lr 1e-4: see test_sharded_step_equals_single_device (Adam's first step and ~0 gradients)
    loop = TrainLoop(tiny_config(tmp_path / "run", **{"trainer.samples_per_step": 8,
                                                      "trainer.lr": 1e-4}),
                     source=QueueSource())
    try:
        stack = loop.pack(make_samples(8, seed=5))
        assert stack.score_index is not None
        step = jax.jit(trainer.make_train_step(loop.graphdef, loop.optimizer, loop.step_config))
        state0 = loop.state
        with_index, m1 = step(state0, stack, loop.ref_params)
        without, m2 = step(state0, dataclasses.replace(stack, score_index=None), loop.ref_params)
        assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-6
        for a, x in zip(jax.tree.leaves(with_index.params), jax.tree.leaves(without.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(x), atol=1e-6)
    finally:
        loop.close()
