"""The regression gate: a corrupted candidate is refused, not published, and the trainer rolls
back to the last good checkpoint; a healthy one is published."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clawjax.loop import TrainLoop
from clawjax.sources import QueueSource, write_replay
from sample_factory import make_samples
from test_trainer import max_param_diff, params_of, tiny_config


def gated_loop(tmp_path) -> TrainLoop:
    probe = tmp_path / "probe.jsonl"
    write_replay(str(probe), make_samples(6, seed=31, prefix="probe"))
    config = tiny_config(tmp_path / "run", **{
        "trainer.samples_per_step": 4, "trainer.lr": 1e-4, "publish.every_steps": 1,
        "publish.dtype": "float32", "gate.enabled": True, "gate.probe": str(probe),
        "gate.margin": 0.5})
    source = QueueSource()
    source.put(make_samples(12, seed=32))
    return TrainLoop(config, source=source)


def published(loop) -> list[str]:
    loop.publisher.wait(timeout=60)
    return sorted(d for d in os.listdir(loop.publisher.publish_dir) if d.startswith("v"))


def test_gate_refuses_a_corrupted_candidate_and_rolls_back(tmp_path):
    loop = gated_loop(tmp_path)
    try:
        loop.train_step(loop.take_samples())
        loop.maybe_publish()  # a healthy small step passes and is published as v1
        assert loop.gate_refusals == 0 and published(loop) == ["v1"]
        # The serving score is the published candidate's (reused from the check, not rescored).
        assert loop.gate.serving_score == pytest.approx(loop.gate.score(loop.state.params),
                                                        abs=1e-6)
        good = params_of(loop)

        loop.train_step(loop.take_samples())
        leaves, treedef = jax.tree.flatten(loop.state.params)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        corrupted = jax.tree.unflatten(treedef, [  # a bad update: every weight knocked far off
            p + 2.0 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])
        loop.state = loop.state.replace(params=corrupted)
        decision = loop.gate.check(loop.state.params)
        assert not decision.passed and decision.candidate < decision.serving - 0.5

        loop.maybe_publish()
        assert loop.gate_refusals == 1
        assert published(loop) == ["v1"]  # nothing new reached the servers
        assert loop.step == 1  # rolled back to the checkpoint of the published version
        assert max_param_diff(good, params_of(loop)) == 0.0
    finally:
        loop.close()


def test_gate_passes_nan_free_candidates_only(tmp_path):
    loop = gated_loop(tmp_path)
    try:
        bad = jax.tree.map(lambda p: jnp.full_like(p, np.nan), loop.state.params)
        assert not loop.gate.check(bad).passed
        assert loop.gate.check(loop.state.params).passed
    finally:
        loop.close()
