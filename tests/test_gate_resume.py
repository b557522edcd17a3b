"""The regression gate across a crash or a stop: a resume rolls back as the run would have (to
the newest checkpoint at or below the last accepted step), never trains the samples of a
discarded step again, and decides a step the gate had not decided on. Helpers and modes are
test_gate's."""

from __future__ import annotations

import json
import os

import pytest

from clawjax.checkpoint import Checkpointer
from clawjax.sources import write_replay
from sample_factory import make_samples
from test_gate import (MODES, corrupt, gated_loop, publish, published, replay_gated_loop,
                       train_and_corrupt_the_last)
from test_trainer import max_param_diff, params_of


def trained_firsts(loop) -> list[tuple[int, str]]:
    """(step, first sample id) of each line of trained.jsonl."""
    with open(os.path.join(loop.workdir, "trained.jsonl")) as f:
        return [(e["step"], e["sample_ids"][0]) for e in map(json.loads, f)]


def accepted_then_corrupted(tmp_path):
    """A replay-fed "checkpoint"-mode loop whose step 1 was accepted (published and
    checkpointed) and whose step 2, corrupted, is checkpointed but not yet decided."""
    loop = replay_gated_loop(tmp_path, "checkpoint", False)
    loop.train_step(loop.take_samples())
    publish(loop)  # v1 accepted and checkpointed
    loop.train_step(loop.take_samples())
    corrupt(loop)
    loop.save_checkpoint()
    loop.checkpointer.wait()
    return loop


@pytest.mark.parametrize("rollback,background", MODES)
def test_a_crash_after_a_rollback_does_not_train_the_discarded_samples_again(
        tmp_path, rollback, background):
    """A rollback deletes the checkpoints newer than the accepted step, and with them the
    source's position past the discarded step's samples, yet goes on with the data. A crash
    before the next checkpoint must go on the same way: the resume takes the samples after
    the discarded ones (not those again, as the accepted step's checkpoint alone would say),
    with the drop counts as they were at the rollback."""
    loop = replay_gated_loop(tmp_path, rollback, background)
    loop.train_step(loop.take_samples())
    loop.save_checkpoint()
    publish(loop)  # v1 accepted, checkpointed at step 1
    loop.dropped["too_long"] += 2  # counted after the accepted step's checkpoint
    loop.train_step(loop.take_samples())
    corrupt(loop)
    loop.save_checkpoint()
    publish(loop)
    assert loop.gate_refusals == 1 and loop.step == 1 and loop.source.position == 8
    loop.checkpointer.wait()
    assert loop.checkpointer.all_steps()[-1] == 1
    loop.close()  # the crash: no checkpoint after the rollback

    resumed = replay_gated_loop(tmp_path, rollback, background, **{"trainer.resume": True})
    try:
        samples = resumed.source.samples
        assert resumed.step == 1 and resumed.gate_refusals == 1   # the run's count goes on
        assert resumed.dropped["too_long"] == 2
        assert "after_rollback" in resumed.checkpointer.gate_record()
        resumed.train_step(resumed.take_samples())
        assert trained_firsts(resumed) == [(1, samples[0].sample_id), (2, samples[8].sample_id)]
        resumed.save_checkpoint()
        resumed.checkpointer.wait()  # step 2 durable: it holds the source's position itself
        assert "after_rollback" not in resumed.checkpointer.gate_record()
    finally:
        resumed.close()


def test_a_crash_after_a_resumes_rollback_does_not_train_the_discarded_samples_again(
        tmp_path):
    """The same for the rollback a resume makes (a refused candidate found on disk): a second
    crash before the next checkpoint resumes past the discarded step's samples too."""
    accepted_then_corrupted(tmp_path).close()  # a crash before the gate decided on step 2

    for attempt in range(2):  # the resume rolls back; then it crashes too, and a third resumes
        resumed = replay_gated_loop(tmp_path, "checkpoint", False, **{"trainer.resume": True})
        try:
            assert resumed.step == 1 and resumed.source.position == 8, attempt
            assert resumed.gate_refusals == 1, attempt   # the resume's refusal, counted once
            assert resumed.checkpointer.all_steps()[-1] == 1
        finally:
            resumed.close()
    resumed = replay_gated_loop(tmp_path, "checkpoint", False, **{"trainer.resume": True})
    try:
        resumed.train_step(resumed.take_samples())
        samples = resumed.source.samples
        assert trained_firsts(resumed) == [(1, samples[0].sample_id), (2, samples[8].sample_id)]
    finally:
        resumed.close()


def trained_steps(loop) -> list[int]:
    with open(os.path.join(loop.workdir, "trained.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.mark.parametrize("rollback,background", MODES)
def test_a_crash_before_the_refusal_is_acted_on_resumes_from_an_accepted_step(
        tmp_path, rollback, background):
    """The candidate of step 2 is checkpointed before the gate decides (here the
    `checkpoint.every_steps` save; in the background "checkpoint" mode also the candidate's
    own), and the process dies before the rollback: in the background modes after the refusal,
    in the foreground ones before the check. The resume must not take step 2 as the accepted
    policy: it rolls back as the run would have, to the newest checkpoint at or below the last
    accepted step (step 1 where accepted states are checkpointed, the initial one in "memory"
    mode), deletes the newer ones, and publishes nothing of step 2."""
    loop = gated_loop(tmp_path, rollback, background)
    start = params_of(loop)
    loop.train_step(loop.take_samples())
    publish(loop)  # v1 accepted
    good = params_of(loop) if rollback == "checkpoint" else start
    loop.train_step(loop.take_samples())
    corrupt(loop)
    loop.save_checkpoint()
    if background:
        loop.maybe_publish()
        assert loop.publisher.wait(timeout=60) and loop.publisher.stats()["gated_out"] == 1
    loop.checkpointer.wait()
    # counted when recorded: by the background gate's thread, not yet in the foreground
    assert loop.checkpointer.latest_step() == 2 and loop.gate_refusals == int(background)
    loop.close()  # the crash: nothing acted on the refusal (no settle_gate, no rollback)

    resumed = gated_loop(tmp_path, rollback, background, **{"trainer.resume": True})
    try:
        expected = 1 if rollback == "checkpoint" else 0
        assert resumed.step == expected and resumed.gate_refusals == 1
        assert max_param_diff(good, params_of(resumed)) == 0.0
        assert max(resumed.checkpointer.all_steps()) == expected
        assert trained_steps(resumed) == [1][:expected]
        assert resumed.gate.serving_score == pytest.approx(
            resumed.gate.score(resumed.state.params), abs=1e-6)
        record = resumed.checkpointer.gate_record()
        assert record == {
            "accepted_step": expected, "serving_score": resumed.gate.serving_score,
            "refused_step": None, "refusals": 1, "after_rollback": record["after_rollback"]}
        # Until a newer checkpoint is durable: going on as the resume's rollback did.
        assert record["after_rollback"]["step"] == expected
        assert published(resumed) == ["v1"]
    finally:
        resumed.close()


def test_a_resume_keeps_an_undecided_step_the_gate_passes(tmp_path):
    """A stop (or crash) after a step the gate has not decided on, healthy: the resume decides
    it against the recorded serving score and goes on from it, losing no step."""
    loop = gated_loop(tmp_path, "checkpoint", True, **{"publish.every_steps": 2})
    loop.train_step(loop.take_samples())
    loop.save_checkpoint()
    loop.checkpointer.wait()
    after = params_of(loop)
    record = loop.checkpointer.gate_record()
    assert record["accepted_step"] == 0 and record["refused_step"] is None
    loop.close()
    resumed = gated_loop(tmp_path, "checkpoint", True,
                         **{"publish.every_steps": 2, "trainer.resume": True})
    try:
        assert resumed.step == 1 and resumed.gate_refusals == 0
        assert max_param_diff(after, params_of(resumed)) == 0.0
        assert resumed.checkpointer.all_steps() == [0, 1] and trained_steps(resumed) == [1]
        assert resumed.checkpointer.gate_record()["accepted_step"] == 1
    finally:
        resumed.close()


def test_memory_mode_keeps_the_newest_checkpoint_at_or_below_the_accepted_step(tmp_path):
    """`gate.rollback = "memory"` keeps the accepted state on device only: the checkpoint a
    resume rolls back to is the newest at or below it, kept through `checkpoint.keep = 1`."""
    loop = gated_loop(tmp_path, "memory", False,
                      **{"publish.every_steps": 3, "checkpoint.keep": 1})
    start = params_of(loop)
    train_and_corrupt_the_last(loop, 3, publish=False)
    loop.checkpointer.wait()
    assert loop.checkpointer.all_steps() == [0, 3]  # 0: the accepted step's
    loop.close()  # the crash: before the gate scored step 3
    resumed = gated_loop(tmp_path, "memory", False, **{
        "publish.every_steps": 3, "checkpoint.keep": 1, "trainer.resume": True})
    try:
        assert resumed.step == 0 and resumed.gate_refusals == 1
        assert max_param_diff(start, params_of(resumed)) == 0.0
        assert resumed.checkpointer.all_steps() == [0]
    finally:
        resumed.close()


def test_a_crash_after_a_memory_rollback_resumes_from_the_accepted_state(tmp_path):
    """`gate.rollback = "memory"` keeps the accepted state on device only. A refusal's rollback
    deletes the newer checkpoints; a crash before the next checkpoint resumed from an older one
    (step 1) while the data source went on past the accepted steps' samples: their updates
    were lost. The rollback now saves the accepted state before deleting anything. (The
    background gate reaches the same `rollback` through `settle_gate`: both failed before.)"""
    background = True
    write_replay(str(tmp_path / "replay.jsonl"), make_samples(20, seed=5))
    loop = replay_gated_loop(tmp_path, "memory", background, **{"publish.every_steps": 2})
    loop.train_step(loop.take_samples())
    loop.save_checkpoint()                         # step 1: the only checkpoint below step 2
    loop.train_step(loop.take_samples())
    publish(loop)                                  # step 2 accepted, in memory only
    accepted = params_of(loop)
    loop.train_step(loop.take_samples())
    loop.save_checkpoint()                         # step 3
    loop.train_step(loop.take_samples())
    corrupt(loop)
    publish(loop)                                  # step 4 refused: back to step 2
    assert loop.step == 2 and loop.gate_refusals == 1
    loop.close()                                   # the crash, before any later checkpoint

    resumed = replay_gated_loop(tmp_path, "memory", background,
                                **{"publish.every_steps": 2, "trainer.resume": True})
    try:
        assert resumed.step == 2 and max_param_diff(accepted, params_of(resumed)) == 0.0
        assert trained_steps(resumed) == [1, 2]
        assert [s.sample_id for s in resumed.take_samples()] == [f"s5-{i}" for i in
                                                                 range(16, 20)]
    finally:
        resumed.close()


class Crash(Exception):
    """The process dying at a chosen point (here: as a rollback deletes the refused steps)."""


@pytest.mark.parametrize("rolled_back_by", ["the run", "a resume"])
def test_a_crash_while_a_rollback_deletes_counts_the_refusal_once(tmp_path, monkeypatch,
                                                                   rolled_back_by):
    """A rollback records its carry before deleting the refused checkpoints; a crash between
    the two used to leave a record without the refused step, so the next resume decided the
    same candidate again and counted its refusal twice. The refused step stays recorded until
    the deletion is done."""
    loop = accepted_then_corrupted(tmp_path)

    def crash(self, step):
        raise Crash(f"killed before deleting the steps after {step}")

    if rolled_back_by == "the run":
        monkeypatch.setattr(Checkpointer, "discard_after", crash)
        with pytest.raises(Crash):
            publish(loop)   # refused: the rollback dies mid-way
        loop.close()
    else:
        loop.close()  # a crash before the gate decided on step 2: the resume rolls back
        monkeypatch.setattr(Checkpointer, "discard_after", crash)
        with pytest.raises(Crash):
            replay_gated_loop(tmp_path, "checkpoint", False, **{"trainer.resume": True})
    monkeypatch.undo()
    assert Checkpointer(str(tmp_path / "run" / "checkpoints")).gate_record()["refusals"] == 1
    resumed = replay_gated_loop(tmp_path, "checkpoint", False, **{"trainer.resume": True})
    try:
        assert resumed.step == 1 and resumed.gate_refusals == 1
        assert resumed.checkpointer.all_steps()[-1] == 1
        assert resumed.checkpointer.gate_record()["refused_step"] is None
    finally:
        resumed.close()
