"""The regression gate: a corrupted candidate is refused, not published, and the trainer rolls
back to the last good checkpoint; a healthy one is published."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clawjax.loop import TrainLoop
from clawjax.sources import QueueSource, write_replay
from sample_factory import make_samples
from test_trainer import max_param_diff, params_of, tiny_config


def gated_loop(tmp_path, rollback: str = "checkpoint") -> TrainLoop:
    probe = tmp_path / "probe.jsonl"
    write_replay(str(probe), make_samples(6, seed=31, prefix="probe"))
    config = tiny_config(tmp_path / "run", **{
        "trainer.samples_per_step": 4, "trainer.lr": 1e-4, "publish.every_steps": 1,
        "publish.dtype": "float32", "gate.enabled": True, "gate.probe": str(probe),
        "gate.margin": 0.5, "gate.rollback": rollback})
    source = QueueSource()
    source.put(make_samples(16, seed=32))
    return TrainLoop(config, source=source)


def published(loop) -> list[str]:
    loop.publisher.wait(timeout=60)
    return sorted(d for d in os.listdir(loop.publisher.publish_dir) if d.startswith("v"))


def corrupt(loop) -> None:
    """A bad update: every weight knocked far off."""
    leaves, treedef = jax.tree.flatten(loop.state.params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    loop.state = loop.state.replace(params=jax.tree.unflatten(treedef, [
        p + 2.0 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]))


@pytest.mark.parametrize("rollback", ["checkpoint", "memory"])
def test_gate_refuses_a_corrupted_candidate_and_rolls_back(tmp_path, rollback):
    loop = gated_loop(tmp_path, rollback)
    try:
        loop.train_step(loop.take_samples())
        loop.maybe_publish()  # a healthy small step passes and is published as v1
        assert loop.gate_refusals == 0 and published(loop) == ["v1"]
        # The serving score is the published candidate's (reused from the check, not rescored).
        assert loop.gate.serving_score == pytest.approx(loop.gate.score(loop.state.params),
                                                        abs=1e-6)
        good = params_of(loop)

        loop.train_step(loop.take_samples())
        corrupt(loop)
        decision = loop.gate.check(loop.state.params)
        assert not decision.passed and decision.candidate < decision.serving - 0.5

        loop.maybe_publish()
        assert loop.gate_refusals == 1
        assert published(loop) == ["v1"]  # nothing new reached the servers
        assert loop.step == 1  # rolled back to the published version
        assert max_param_diff(good, params_of(loop)) == 0.0
        # The good state is still the rollback target after training on from it (the train
        # step donates its input state: the kept copy must not be that buffer).
        loop.train_step(loop.take_samples())
        corrupt(loop)
        loop.maybe_publish()
        assert loop.gate_refusals == 2 and loop.step == 1
        assert max_param_diff(good, params_of(loop)) == 0.0
    finally:
        loop.close()


@pytest.mark.parametrize("rollback", ["checkpoint", "memory"])
def test_a_rollback_discards_the_abandoned_trajectorys_checkpoints(tmp_path, rollback):
    """A checkpoint saved after the good state (here: step 2, corrupted) is deleted by the
    rollback, so a restart resumes from the good state, and training to step 2 again saves it
    (orbax refuses to save a step that exists)."""
    loop = gated_loop(tmp_path, rollback)
    try:
        loop.train_step(loop.take_samples())
        loop.maybe_publish()  # v1 accepted
        loop.train_step(loop.take_samples())
        corrupt(loop)
        loop.save_checkpoint()  # e.g. the checkpoint.every_steps cadence, before the gate
        loop.checkpointer.wait()
        assert 2 in loop.checkpointer.all_steps()
        loop.maybe_publish()
        assert loop.gate_refusals == 1 and loop.step == 1
        assert max(loop.checkpointer.all_steps()) <= 1
        loop.train_step(loop.take_samples())
        loop.save_checkpoint()
        loop.checkpointer.wait()
        assert loop.checkpointer.latest_step() == 2
        with open(os.path.join(loop.workdir, "trained.jsonl")) as f:
            steps = [json.loads(line)["step"] for line in f]
        assert steps == [1, 2]  # the discarded step's samples are cut from the log
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


def test_the_trainer_thread_time_is_reported(tmp_path):
    """`gate_s` (scoring the candidate after step 1) lands in step 2's row, inside
    `after_step_s`; `take_wait_s` is each step's wait for samples."""
    loop = gated_loop(tmp_path, "memory")
    try:
        with loop.config.unlocked():
            loop.config.trainer.steps = 2
        loop.run()
    finally:
        loop.close()
    with open(os.path.join(loop.workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["after_step_s"] == 0.0 and rows[0]["gate_s"] == 0.0  # nothing before step 1
    assert 0.0 < rows[1]["gate_s"] <= rows[1]["after_step_s"]
    assert all(r["take_wait_s"] >= 0.0 for r in rows)
