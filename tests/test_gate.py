"""The regression gate: a corrupted candidate is refused, not published, and the trainer rolls
back to the last good state; a healthy one is published. Both gate modes: scoring on the trainer
thread (`gate.background=False`) and in the publisher thread, where the rollback happens at the
trainer's next step boundary (`settle_gate`)."""

from __future__ import annotations

import dataclasses
import json
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clawjax.loop import TrainLoop
from clawjax.sources import QueueSource, write_replay
from sample_factory import make_samples
from test_trainer import max_param_diff, params_of, tiny_config


MODES = [(rollback, background) for rollback in ("checkpoint", "memory")
         for background in (False, True)]


def gated_loop(tmp_path, rollback: str = "checkpoint", background: bool = True,
               **overrides) -> TrainLoop:
    probe = tmp_path / "probe.jsonl"
    write_replay(str(probe), make_samples(6, seed=31, prefix="probe"))
    config = tiny_config(tmp_path / "run", **{
        "trainer.samples_per_step": 4, "trainer.lr": 1e-4, "publish.every_steps": 1,
        "publish.dtype": "float32", "gate.enabled": True, "gate.probe": str(probe),
        "gate.margin": 0.5, "gate.rollback": rollback, "gate.background": background,
        **overrides})
    source = QueueSource()
    source.put(make_samples(16, seed=32))
    return TrainLoop(config, source=source)


def published(loop) -> list[str]:
    loop.publisher.wait(timeout=60)
    return sorted(d for d in os.listdir(loop.publisher.publish_dir) if d.startswith("v"))


def publish(loop) -> None:
    """A publish step's gate work, settled: the decision is acted on before returning."""
    loop.maybe_publish()
    loop.publisher.wait(timeout=60)
    loop.settle_gate()


def corrupt(loop) -> None:
    """A bad update: every weight knocked far off."""
    leaves, treedef = jax.tree.flatten(loop.state.params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    loop.state = loop.state.replace(params=jax.tree.unflatten(treedef, [
        p + 2.0 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]))


def train_and_corrupt_the_last(loop, steps: int, publish: bool) -> None:
    """`steps` steps, each checkpointed (and, with `publish`, offered to the gate and the
    publisher); the last one's update is corrupted before that."""
    for i in range(steps):
        loop.train_step(loop.take_samples())
        if i == steps - 1:
            corrupt(loop)
        loop.save_checkpoint()
        if publish:
            loop.maybe_publish()


@pytest.mark.parametrize("rollback,background", MODES)
def test_gate_refuses_a_corrupted_candidate_and_rolls_back(tmp_path, rollback, background):
    loop = gated_loop(tmp_path, rollback, background)
    try:
        loop.train_step(loop.take_samples())
        publish(loop)  # a healthy small step passes and is published as v1
        assert loop.gate_refusals == 0 and published(loop) == ["v1"]
        # The serving score is the published candidate's (reused from the check, not rescored).
        assert loop.gate.serving_score == pytest.approx(loop.gate.score(loop.state.params),
                                                        abs=1e-6)
        good = params_of(loop)

        loop.train_step(loop.take_samples())
        corrupt(loop)
        decision = loop.gate.check(loop.state.params)
        assert not decision.passed and decision.candidate < decision.serving - 0.5

        publish(loop)
        assert loop.gate_refusals == 1
        assert published(loop) == ["v1"]  # nothing new reached the servers
        assert loop.step == 1  # rolled back to the published version
        assert max_param_diff(good, params_of(loop)) == 0.0
        # The good state is still the rollback target after training on from it (the train
        # step donates its input state: the kept copy must not be that buffer).
        loop.train_step(loop.take_samples())
        corrupt(loop)
        publish(loop)
        assert loop.gate_refusals == 2 and loop.step == 1
        assert max_param_diff(good, params_of(loop)) == 0.0
    finally:
        loop.close()


@pytest.mark.parametrize("rollback,background", MODES)
def test_a_rollback_discards_the_abandoned_trajectorys_checkpoints(tmp_path, rollback,
                                                                    background):
    """A checkpoint saved after the good state (here: step 2, corrupted) is deleted by the
    rollback, so a restart resumes from the good state, and training to step 2 again saves it
    (orbax refuses to save a step that exists)."""
    loop = gated_loop(tmp_path, rollback, background)
    try:
        loop.train_step(loop.take_samples())
        publish(loop)  # v1 accepted
        loop.train_step(loop.take_samples())
        corrupt(loop)
        loop.save_checkpoint()  # e.g. the checkpoint.every_steps cadence, before the gate
        loop.checkpointer.wait()
        assert 2 in loop.checkpointer.all_steps()
        publish(loop)
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


def test_a_background_refusal_discards_what_was_trained_on_top_of_it(tmp_path):
    """The trainer trains on while the publisher thread scores: a refused candidate voids every
    later candidate of its trajectory (not scored, not published, even one that would pass)
    until the trainer settles, rolls back, and publishes from the good state again."""
    loop = gated_loop(tmp_path, "memory", background=True)
    try:
        loop.train_step(loop.take_samples())
        publish(loop)  # v1 accepted
        good, good_params = params_of(loop), jax.tree.map(jnp.copy, loop.state.params)
        loop.train_step(loop.take_samples())
        corrupt(loop)
        loop.maybe_publish()  # candidate 2, scored in the background
        assert loop.publisher.wait(timeout=60)
        assert loop.publisher.stats()["gated_out"] == 1 and loop.gate_refusals == 1
        loop.train_step(loop.take_samples())  # step 3, on top of the refused candidate
        loop.state = loop.state.replace(params=good_params)  # would pass the gate
        loop.maybe_publish()
        assert loop.publisher.wait(timeout=60)
        assert loop.publisher.stats()["gated_out"] == 2  # void: its trajectory was refused
        assert published(loop) == ["v1"]
        assert loop.settle_gate() and not loop.settle_gate()  # one refusal, acted on once
        assert loop.gate_refusals == 1 and loop.step == 1
        assert max_param_diff(good, params_of(loop)) == 0.0
        loop.train_step(loop.take_samples())
        publish(loop)  # a healthy candidate of the new trajectory passes
        assert loop.gate_refusals == 1 and published(loop) == ["v1", "v2"]
    finally:
        loop.close()


def test_run_settles_a_refused_last_candidate_and_trains_back_to_the_step_count(tmp_path):
    """A refusal that arrives after the last step still rolls back: `run` waits for the last
    decision, then trains the discarded steps again, so it ends at `trainer.steps` on a state
    the gate accepted."""
    loop = gated_loop(tmp_path, "memory", background=True)
    real_check, decisions = loop.gate.check, []

    def refuse_the_second(params):  # the real gate's scores; the second verdict forced
        decision = real_check(params)
        decisions.append(decision)
        return dataclasses.replace(decision, passed=len(decisions) != 2)

    loop.gate.check = refuse_the_second
    try:
        with loop.config.unlocked():
            loop.config.trainer.steps = 2
        loop.run()
        assert loop.step == 2 and loop.gate_refusals == 1 and len(decisions) == 3
        assert published(loop) == ["v1", "v2"]
        assert loop.checkpointer.latest_step() == 2
        with open(os.path.join(loop.workdir, "trained.jsonl")) as f:
            steps = [json.loads(line)["step"] for line in f]
        assert steps == [1, 2]  # the refused step 2's samples are cut from the log
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


@pytest.mark.parametrize("background", [False, True])
def test_the_trainer_thread_time_is_reported(tmp_path, background):
    """`gate_s` (the trainer thread's gate work after step 1: scoring the candidate, or copying
    it for the publisher thread to score) lands in step 2's row, inside `after_step_s`;
    `take_wait_s` is each step's wait for samples."""
    loop = gated_loop(tmp_path, "memory", background)
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
    if not background:  # scored on the trainer thread: all of its gate time
        assert rows[1]["gate_score_s"] == rows[1]["gate_s"]
    assert all(r["take_wait_s"] >= 0.0 for r in rows)


def test_checkpoint_keep_never_prunes_the_rollback_target(tmp_path):
    """`checkpoint.keep = 2` with a checkpoint every step: the accepted step 0 is older than
    the two newest by the time step 3 is refused, and the rollback still restores it."""
    loop = gated_loop(tmp_path, "checkpoint", background=False,
                      **{"publish.every_steps": 3, "checkpoint.keep": 2})
    loop.source.put(make_samples(16, seed=33, prefix="more"))
    try:
        start = params_of(loop)
        train_and_corrupt_the_last(loop, 3, publish=True)
        assert loop.gate_refusals == 1 and loop.step == 0
        assert max_param_diff(start, params_of(loop)) == 0.0
        # Once a later step is accepted, step 0 is pruned like any other (at the next save).
        for _ in range(4):
            loop.train_step(loop.take_samples())
            loop.save_checkpoint()
            loop.maybe_publish()
        loop.checkpointer.wait()
        assert loop.gate_refusals == 1 and loop.step == 4
        assert loop.checkpointer.all_steps() == [3, 4]
    finally:
        loop.close()


@pytest.mark.parametrize("rollback", ["checkpoint", "memory"])
def test_a_rollback_restores_the_train_state_only(tmp_path, rollback):
    """Both rollback modes go on with the data and keep the drop counts as they were: the
    samples of the discarded step are not trained again and no drop is counted twice."""
    loop = replay_gated_loop(tmp_path, rollback, False)
    try:
        loop.dropped["invalid"] += 1   # counted before the accepted step's checkpoint
        loop.train_step(loop.take_samples())
        loop.maybe_publish()
        loop.train_step(loop.take_samples())
        corrupt(loop)
        loop.maybe_publish()
        assert loop.gate_refusals == 1 and loop.step == 1
        assert loop.dropped["invalid"] == 1
        assert loop.source.position == 8
        loop.train_step(loop.take_samples())
        with open(os.path.join(loop.workdir, "trained.jsonl")) as f:
            trained = [json.loads(line) for line in f]
        firsts = [entry["sample_ids"][0] for entry in trained]
        assert [entry["step"] for entry in trained] == [1, 2]
        assert firsts == [loop.source.samples[0].sample_id, loop.source.samples[8].sample_id]
    finally:
        loop.close()


def replay_gated_loop(tmp_path, rollback: str, background: bool, **overrides) -> TrainLoop:
    """`gated_loop` reading a replay file (16 samples, 4 a step), whose position is
    checkpointed: which samples a resumed run takes next shows where its source went on."""
    replay = tmp_path / "replay.jsonl"
    if not replay.exists():
        write_replay(str(replay), make_samples(16, seed=5))
    probe = tmp_path / "probe.jsonl"
    write_replay(str(probe), make_samples(6, seed=31, prefix="probe"))
    config = tiny_config(tmp_path / "run", replay=str(replay), **{
        "trainer.samples_per_step": 4, "trainer.lr": 1e-4, "publish.every_steps": 1,
        "publish.dtype": "float32", "gate.enabled": True, "gate.probe": str(probe),
        "gate.margin": 0.5, "gate.rollback": rollback, "gate.background": background,
        **overrides})
    return TrainLoop(config)


def test_a_coalesced_candidate_is_no_longer_protected(tmp_path):
    """Background "checkpoint" mode: a candidate whose publish is replaced by a newer one while
    the gate scores another is never decided; its checkpoint must not stay protected, or
    `checkpoint.keep` is never honoured for it."""
    loop = gated_loop(tmp_path, "checkpoint", True, **{"checkpoint.keep": 1})
    loop.source.put(make_samples(40, seed=40))
    real_check, release, scoring = loop.gate.check, threading.Event(), threading.Event()

    def slow_check(params):  # the first candidate's scoring takes until released
        scoring.set()
        assert release.wait(60)
        return real_check(params)

    loop.gate.check = slow_check
    try:
        for step in (1, 2, 3):  # 2 waits behind 1 and is replaced by 3
            loop.train_step(loop.take_samples())
            loop.maybe_publish()
            assert scoring.wait(60)
            assert loop.settle_gate() is False
        assert loop.publisher.stats()["coalesced"] == 1
        assert 2 not in loop._undecided and 2 not in loop.checkpointer.protected_steps
        release.set()
        assert loop.publisher.wait(timeout=60) and not loop.settle_gate()
        assert published(loop) == ["v1", "v3"] and loop._undecided == set()
        for _ in range(2):
            loop.train_step(loop.take_samples())
            publish(loop)
        loop.checkpointer.wait()
        assert loop.step == 5 and loop.checkpointer.protected_steps == {5}
        assert loop.checkpointer.all_steps() == [4, 5]  # keep 1, + the pre-decision good step
    finally:
        release.set()
        loop.close()


def test_a_candidate_whose_scoring_raises_is_no_longer_protected(tmp_path):
    """Background "checkpoint" mode: when scoring a candidate raises (its publish fails and is
    counted), the candidate is decided by nobody: its checkpoint must not stay protected, and
    the next candidate is scored and published as usual."""
    loop = gated_loop(tmp_path, "checkpoint", True, **{"checkpoint.keep": 1})
    real_check, calls = loop.gate.check, []

    def failing_once(params):
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("probe scoring failed")
        return real_check(params)

    loop.gate.check = failing_once
    try:
        loop.train_step(loop.take_samples())
        publish(loop)
        stats = loop.publisher.stats()
        assert stats["failed"] == 1 and "probe scoring failed" in stats["last_error"]
        assert loop._undecided == set() and 1 not in loop.checkpointer.protected_steps
        assert loop.gate_refusals == 0 and published(loop) == []
        loop.train_step(loop.take_samples())
        publish(loop)
        loop.checkpointer.wait()
        assert published(loop) == ["v2"] and loop.checkpointer.protected_steps == {2}
        # keep 1 pruned step 1 when step 2 was saved; step 0 was then the accepted step, kept
        assert loop.checkpointer.all_steps() == [0, 2]
    finally:
        loop.close()


def test_gate_scores_a_kernel_attention_model_on_a_sharded_mesh_as_the_xla_one():
    """A model with `attention = "pallas_gpu"` (the flash kernel, interpreted here) on the
    2 × 2 × 2 mesh: its kernel splits rows over data × fsdp = 4 devices, so the gate packs the
    probe to a multiple of 4 rows (zero padding rows, outside the score). Its score equals the
    XLA model's on the same mesh and on one device, unpadded (≤ 1e-5 relative)."""
    from flax import nnx

    from clawjax import config as config_lib, model as cm, sharding
    from clawjax.gate import RegressionGate

    probe = make_samples(3, vocab_size=64, seed=1, min_len=8, max_len=12, opd_every=0)
    meshes = {"one device": sharding.single_device_mesh(), "2x2x2": sharding.make_mesh(2, 2, 2)}
    scores = {}
    for where, attention in (("one device", "xla"), ("2x2x2", "pallas_gpu"), ("2x2x2", "xla")):
        config = cm.ModelConfig.from_hf(dict(config_lib.TINY_QWEN3, vocab_size=64))
        model = cm.init_random(config.replace(attention=attention), seed=1, mesh=meshes[where])
        graphdef, params = nnx.split(model, nnx.Param)
        gate = RegressionGate(graphdef, probe, margin=0.1, token_budget=32, chunk=64)
        scores[where, attention] = gate.score(params)
        rows = [b.tokens.shape[0] for b in gate.batches]
        assert all(r % (4 if where == "2x2x2" else 1) == 0 for r in rows), (where, rows)
        assert sum(int(np.sum(b.loss_mask)) for b in gate.batches) == \
            sum(int(np.sum(s.loss_mask)) for s in probe)  # the padding rows score nothing
    reference = scores["one device", "xla"]
    assert np.isfinite(reference) and reference < 0.0
    for key, score in scores.items():
        np.testing.assert_allclose(score, reference, rtol=1e-5, err_msg=str(key))
