"""The samples a training loop takes: invalid, too long, stale and rollout-log-prob-less ones
are counted and not trained; a replay too short for one step is refused naming the counts; a
stop mid-step trains no short step and gives the samples in hand back. Helpers are
test_trainer's."""

from __future__ import annotations

import dataclasses
import json
import math
import threading

import numpy as np
import pytest

from clawjax import config as config_lib
from clawjax.loop import TrainLoop
from clawjax.sources import QueueSource, ReplaySource, write_replay
from sample_factory import make_samples
from test_trainer import tiny_config


def test_invalid_and_oversized_samples_are_counted_not_trained(tmp_path):
    good = make_samples(4, seed=5)
    nan_logp = make_samples(1, seed=6, prefix="nan")[0]
    nan_logp.rollout_logp[0] = np.nan
    huge = make_samples(1, seed=7, prefix="long", min_len=400, max_len=400)[0]
    unknown = dataclasses.replace(make_samples(1, seed=8, prefix="no-logp")[0], rollout_logp=None)
    source = QueueSource()
    source.put([nan_logp, huge, unknown, *good])
    loop = TrainLoop(tiny_config(tmp_path / "drop", **{"trainer.samples_per_step": 4}),
                     source=source)
    taken = loop.take_samples()
    assert [s.sample_id for s in taken] == [s.sample_id for s in good]
    assert loop.dropped == {"invalid": 2, "too_long": 1, "stale": 0}  # zeros listed too


def test_responses_longer_than_max_response_len_are_dropped_as_too_long(tmp_path):
    """`trainer.max_response_len` bounds the response, whatever the sample's total length
    (SPEC §6: responses ≤ 8192 tokens in the reference run)."""
    samples = sorted(make_samples(8, seed=3, min_len=20, max_len=60),
                     key=lambda s: -s.response_len)  # the longest come first
    bound = samples[3].response_len
    short = [s.sample_id for s in samples if s.response_len <= bound]
    source = QueueSource()
    source.put(samples)
    loop = TrainLoop(tiny_config(tmp_path / "run", **{
        "trainer.samples_per_step": len(short), "trainer.max_response_len": bound}),
        source=source)
    assert sorted(s.sample_id for s in loop.take_samples()) == sorted(short)
    assert loop.dropped == {"invalid": 0, "too_long": 8 - len(short), "stale": 0}
    assert 0 < len(short) < 8 and all(len(s.tokens) <= 1024 for s in samples)
    loop.close()


def test_a_run_ending_on_an_error_checkpoints_the_step_with_its_samples_listed(tmp_path):
    """An error raised after an update (here the `extra_metrics` hook, on step 2) ends `run`
    with a checkpoint of that update: its meta must list the step's samples (a resume
    acknowledges them rather than train them again) and the trained-step log must hold it."""
    samples = make_samples(8, seed=13)
    steps = []

    def extra():
        steps.append(len(steps) + 1)
        if len(steps) == 2:
            raise RuntimeError("the stats endpoint failed")
        return {}
    source = QueueSource()
    source.put(samples)
    loop = TrainLoop(tiny_config(tmp_path / "run", **{
        "trainer.samples_per_step": 4, "trainer.steps": 2, "checkpoint.every_steps": 50}),
        source=source, extra_metrics=extra)
    with pytest.raises(RuntimeError, match="stats endpoint"):
        loop.run()
    loop.close()
    assert loop.checkpointer.latest_step() == 2
    meta_dir = tmp_path / "run" / "checkpoints" / "2" / "meta"
    meta = json.loads(next(p for p in meta_dir.iterdir() if not p.name.startswith("_"))
                      .read_text())
    assert set(meta["unacked_ids"]) == {s.sample_id for s in samples}  # steps 1 and 2
    with open(tmp_path / "run" / "trained.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_recomputed_old_logprobs_need_no_rollout_logprobs(tmp_path):
    """Under loss.old_logp = 'recompute' the old policy is the parameters before the update: a
    sample without `rollout_logp` is admitted and trained."""
    samples = [dataclasses.replace(s, rollout_logp=None) for s in make_samples(4, seed=12)]
    source = QueueSource()
    source.put(samples)
    loop = TrainLoop(tiny_config(tmp_path / "recompute", **{
        "trainer.samples_per_step": 4, "loss.old_logp": "recompute"}), source=source)
    taken = loop.take_samples()
    assert [s.sample_id for s in taken] == [s.sample_id for s in samples]
    assert math.isfinite(loop.train_step(taken)["loss"])


def test_stale_samples_are_dropped(tmp_path):
    samples = make_samples(4, seed=8)
    old = make_samples(1, seed=9, prefix="old")[0]
    source = QueueSource()
    source.put(samples)
    loop = TrainLoop(tiny_config(tmp_path / "stale", **{
        "trainer.samples_per_step": 4, "trainer.max_staleness": 0}), source=source)
    first = loop.train_step(loop.take_samples())
    source.put([old, *make_samples(4, seed=10, prefix="new")])
    for s in source._queue.queue:
        if s.sample_id.startswith("new"):
            s.policy_version = 1
    taken = loop.take_samples()
    assert all(s.sample_id.startswith("new") for s in taken)
    assert loop.dropped["stale"] == 1
    second = loop.train_step(taken)
    # Every reason is in every step's metrics, zeros included: a count is never just absent.
    assert {k: v for k, v in first.items() if k.startswith("dropped_")} == {
        "dropped_invalid": 0.0, "dropped_too_long": 0.0, "dropped_stale": 0.0}
    assert second["dropped_stale"] == 1.0 and second["dropped_invalid"] == 0.0


def test_a_replay_file_smaller_than_one_step_is_refused_at_start_up(tmp_path):
    replay = tmp_path / "replay.jsonl"
    write_replay(str(replay), make_samples(3, seed=4))
    config = tiny_config(tmp_path / "run", replay=replay, **{"trainer.samples_per_step": 4})
    with pytest.raises(config_lib.ConfigError,
                       match=r"'replay' = .*replay\.jsonl.*expected a file of at least "
                             r"trainer.samples_per_step = 4 samples .*it holds 3") as refused:
        TrainLoop(config)
    assert refused.value.key == "replay"  # the key every config error names (the CLI's line)


def test_a_replay_that_starts_over_within_a_step_names_replay_and_the_counts(tmp_path):
    """Too long samples rejected at admit leave fewer admissible samples than one step needs:
    the replay would start over and take a sample already in hand (before: two copies in one
    step and a misleading error from `pack`)."""
    replay = tmp_path / "replay.jsonl"
    write_replay(str(replay), make_samples(7, seed=1, prefix="short") +
                 make_samples(3, seed=2, min_len=300, max_len=400, prefix="long"))
    loop = TrainLoop(tiny_config(tmp_path / "run", replay=replay, **{
        "trainer.samples_per_step": 8}))
    with pytest.raises(config_lib.ConfigError, match=(
            r"'replay' = .*replay\.jsonl.*trainer\.samples_per_step = 8.* found 7 admissible")):
        loop.take_samples()
    assert loop.dropped["too_long"] == 3
    loop.close()


def test_a_stop_while_waiting_trains_no_short_step_and_gives_the_samples_back(tmp_path):
    """A stop while `take_samples` waits (3 of samples_per_step = 8 in hand) trains nothing:
    the 3 go back to the source (before: a 3-sample step was trained and checkpointed)."""
    source = QueueSource()
    samples = make_samples(3, seed=41)
    source.put(samples)
    loop = TrainLoop(tiny_config(tmp_path / "run", **{
        "trainer.steps": 5, "trainer.samples_per_step": 8, "trainer.take_timeout_s": 0.5}),
        source=source)
    threading.Timer(1.0, loop.stop).start()
    loop.run()
    assert loop.step == 0 and not (tmp_path / "run" / "trained.jsonl").exists()
    assert loop.checkpointer.latest_step() == 0
    assert [s.sample_id for s in source.take(8, timeout_s=0.5)] == [
        s.sample_id for s in samples]
    loop.close()


def test_a_replay_stop_mid_step_is_trained_in_full_after_the_restart(tmp_path):
    """A stop mid-step with a replay source: the samples in hand are not trained, and the
    checkpoint saved at the stop records them as not consumed, so the resumed run's first
    step is exactly the interrupted one (the rejected sample is not counted twice)."""
    short = make_samples(9, seed=42)
    long_ = make_samples(1, seed=43, min_len=300, max_len=300, prefix="long")
    replay = tmp_path / "replay.jsonl"
    write_replay(str(replay), short[:3] + long_ + short[3:])
    overrides = {"trainer.steps": 1, "trainer.samples_per_step": 4}
    loop_ref = [None]

    class StopOnReject(ReplaySource):  # a SIGTERM landing between two takes of one step
        def reject(self, sample, reason):
            loop_ref[0].stop()

    loop = TrainLoop(tiny_config(tmp_path / "run", **overrides),
                     source=StopOnReject(str(replay)))
    loop_ref[0] = loop
    loop.run()
    loop.close()
    assert loop.step == 0 and not (tmp_path / "run" / "trained.jsonl").exists()
    resumed = TrainLoop(tiny_config(tmp_path / "run", replay=replay, **{
        **overrides, "trainer.resume": True}))
    resumed.run()
    resumed.close()
    with open(tmp_path / "run" / "trained.jsonl") as f:
        lineage = [json.loads(line) for line in f]
    assert lineage == [{"step": 1, "sample_ids": [s.sample_id for s in short[:4]]}]
    assert resumed.dropped["too_long"] == 1


def _with_topk(sample, k: int):
    """`sample` as an OPD sample carrying a teacher top-K of width `k` (rows of mass 0.5)."""
    r = sample.response_len
    ids = np.stack([np.arange(k) + 3 * i for i in range(r)]).astype(np.int32)
    return dataclasses.replace(sample, kind="opd", reward=0.0, teacher_logp=np.full(r, -1.0),
                               teacher_topk_logp=np.log(np.full((r, k), 0.5 / k)),
                               teacher_topk_ids=ids)


@pytest.mark.parametrize("configured", [0, 2])
def test_a_sample_of_another_top_k_width_is_dropped_not_a_crash(tmp_path, configured):
    """One step packs one top-K width: `rollout.teacher_topk` when set, else the first top-K
    sample's. A sample of another width (e.g. the proxy restarted with another --teacher-topk)
    is dropped as invalid; before, `pack` raised in `train_step` and the run died."""
    four, two, *rest = make_samples(5, seed=16)
    four, two = _with_topk(four, 4), _with_topk(two, 2)
    source = QueueSource()
    source.put([four, two, *rest])
    loop = TrainLoop(tiny_config(tmp_path / "run", **{
        "trainer.samples_per_step": 4, "loss.topk_coef": 1.0,
        "rollout.teacher_topk": configured}), source=source)
    taken = loop.take_samples()
    kept = four if configured == 0 else two
    assert [s.sample_id for s in taken] == [kept.sample_id] + [s.sample_id for s in rest]
    assert loop.dropped["invalid"] == 1
    assert math.isfinite(loop.train_step(taken)["loss"])
    loop.close()


def test_a_sample_put_twice_into_the_queue_is_trained_once(tmp_path):
    """Puts are idempotent by sample_id (a retried put): the second copy is ignored, within a
    step (before: `pack` refused the step) and across steps (before: trained twice)."""
    samples = make_samples(6, seed=17)
    source = QueueSource()
    source.put(samples[:2])
    source.put([samples[1], samples[0], samples[2]])
    source.put(samples[3:])
    loop = TrainLoop(tiny_config(tmp_path / "run", **{
        "trainer.samples_per_step": 3, "trainer.steps": 2, "trainer.take_timeout_s": 0.5}),
        source=source)
    loop.run()
    loop.close()
    with open(tmp_path / "run" / "trained.jsonl") as f:
        trained = [sid for line in f for sid in json.loads(line)["sample_ids"]]
    assert sorted(trained) == sorted(s.sample_id for s in samples)


def test_truncated_importance_weights_need_rollout_logprobs_even_when_recomputing(tmp_path):
    """`loss.use_tis` weighs by exp(old_logp − rollout_logp): with 'recompute' a sample without
    `rollout_logp` would weigh by p(token) (zeros in their place). Dropped as invalid."""
    samples = make_samples(4, seed=18)
    unknown = dataclasses.replace(make_samples(1, seed=19, prefix="nologp")[0],
                                  rollout_logp=None)
    source = QueueSource()
    source.put([unknown, *samples])
    loop = TrainLoop(tiny_config(tmp_path / "run", **{
        "trainer.samples_per_step": 4, "loss.old_logp": "recompute", "loss.use_tis": True}),
        source=source)
    assert [s.sample_id for s in loop.take_samples()] == [s.sample_id for s in samples]
    assert loop.dropped["invalid"] == 1
    loop.close()
