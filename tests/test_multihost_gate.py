"""The regression gate with 2 processes × 4 CPU devices (jax.distributed, a local coordinator)
against the same gated job in 1 process × 8 devices.

The job (`_job`, a replay file of 32 samples, 8 a step, `gate.rollback` "checkpoint", scored on
the trainer thread: the only gate mode of a multi-process run) drives `TrainLoop` by hand:

1. step 1 passes the gate and is published (v1, checkpointed: the rollback target);
2. step 2 is checkpointed; step 3 is corrupted (every weight knocked far off) and refused: the
   rollback restores step 1 collectively, deletes checkpoint 2, gathers the ids trained since
   it from both processes into the gate record, and the run trains step 2 again on the
   samples after the discarded ones;
3. step 3 is trained, corrupted and checkpointed, and the job "crashes" before the gate
   decides; a resume (a new `TrainLoop` in the same processes) refuses it and rolls back to
   step 1, deleting checkpoints 2 and 3.

Both processes must end each rollback at the same step, each holding its shards of the accepted
train state bit for bit, with the same checkpoints left; the records (gate.json, the
trained-samples logs of both processes) must match the one-process run's, and the parameters
too (≤ 1e-5, as `test_multihost`'s step). Each worker is a fresh Python process
(`python tests/test_multihost_gate.py MODE ...`) run under a timeout: a rollback whose
collectives do not match between the processes fails the test instead of hanging it. Process 1
lists the checkpoints late during a rollback (`_lag_listings_in_rollbacks`), so a rollback
that lets process 0 delete before every process has listed fails here every time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_multihost import ROOT, TOL, _config, _env, _free_port, _host_params  # noqa: E402

FILE_SAMPLES = 32  # 4 steps of 8 without the replay starting over
TIMEOUT_S = 240
# after each rollback: the resume's finds step 0 pruned (`checkpoint.keep` = 3 at step 3's save)
CHECKPOINTS_LEFT = {"rollback": [0, 1], "resume": [1]}
# The run's refusals so far: the run-time one, then the resume's too (gate.json carries the count)
REFUSALS = {"rollback": 1, "resume": 2}
_FAR_OFF = None  # `_far_off`, jitted once per worker (`_job`)


# ---------------------------------------------------------------------------- worker side
def _gate_config(workdir: str, replay: str, probe: str):
    c = _config(workdir, replay)
    c.trainer.lr = 1e-4  # a healthy step stays well inside the margin
    c.checkpoint.every_steps = 100  # only the saves the job makes itself
    c.publish.every_steps, c.publish.dtype = 1, "float32"
    c.gate.enabled, c.gate.probe, c.gate.margin = True, probe, 0.5
    c.gate.rollback, c.gate.background = "checkpoint", False
    return c


def _far_off(params):
    """Every weight knocked far off: sign flipped, scaled ×4 and shifted (elementwise, so the
    same values on any mesh)."""
    import jax

    return jax.tree.map(lambda p: -4.0 * p + 0.1, params)


def _corrupt(loop) -> None:
    """A bad update: a candidate the gate must refuse."""
    loop.state = loop.state.replace(params=_FAR_OFF(loop.state.params))


def _local_shards(state) -> list[np.ndarray]:
    """This process's shards of every array of the train state (params, optimizer, step)."""
    import jax

    return [np.asarray(s.data) for x in jax.tree.leaves(state)
            for s in sorted(x.addressable_shards, key=lambda s: str(s.index))]


def _local_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert len(a) == len(b)
    return max(float(np.max(np.abs(x.astype(np.float64) - y))) if x.size else 0.0
               for x, y in zip(a, b))


def _lag_listings_in_rollbacks(seconds: float = 0.5) -> None:
    """Makes this process list the checkpoints late during a rollback (its own or a resume's):
    each `Checkpointer.all_steps` then waits `seconds` first. Process 1 runs with it, so that
    process 0 would delete before process 1 lists whenever a rollback lets it (a rollback whose
    processes do not agree on which checkpoints to delete fails this test every time, not once
    in a while); a rollback that makes them agree is only that much slower."""
    import time

    from clawjax import checkpoint, loop_gate

    rolling_back = [False]

    def during(method):
        def wrapped(self, *args, **kwargs):
            rolling_back[0] = True
            try:
                return method(self, *args, **kwargs)
            finally:
                rolling_back[0] = False
        return wrapped

    loop_gate.GateMixin.rollback = during(loop_gate.GateMixin.rollback)
    loop_gate.GateMixin._resume_gated = during(loop_gate.GateMixin._resume_gated)
    all_steps = checkpoint.Checkpointer.all_steps

    def late(self):
        if rolling_back[0]:
            time.sleep(seconds)
        return all_steps(self)

    checkpoint.Checkpointer.all_steps = late


def _trained(loop) -> list[list]:
    with open(loop._trained_log) as f:
        return [[e["step"], e["sample_ids"]] for e in map(json.loads, f)]


def _snapshot(loop, accepted_shards, name: str, out: str, report: dict) -> None:
    """What this process holds after a rollback: its step, its shards against the accepted
    state's, the checkpoints left, its trained log; the gathered parameters saved to `out`."""
    import jax

    report[name] = {
        "step": loop.step, "refusals": loop.gate_refusals,
        "local_diff": _local_diff(_local_shards(loop.state), accepted_shards),
        "checkpoints": loop.checkpointer.all_steps(), "trained": _trained(loop),
        "serving_score": loop.gate.serving_score,
        # gate.json is written by process 0 only: its view is the record
        "record": loop.checkpointer.gate_record() if jax.process_index() == 0 else None,
    }
    np.savez(out.replace(".json", f".{name}.npz"), **_host_params(loop.state.params))


def _job(root, replay, probe, out, coordinator="", num_processes=-1, process_id=-1):
    from clawjax import distributed

    config = _gate_config(os.path.join(root, "run"), replay, probe)
    config.distributed.coordinator_address = coordinator
    config.distributed.num_processes, config.distributed.process_id = num_processes, process_id
    config.distributed.enabled = bool(coordinator)
    distributed.maybe_initialize(config)
    import jax
    from clawjax.loop import TrainLoop

    # The resume's `TrainLoop` compiles the same programs again: from the job's cache (process
    # 0 writes it, every process reads it).
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    global _FAR_OFF
    _FAR_OFF = jax.jit(_far_off, donate_argnums=0)

    report = {"process": jax.process_index(), "of": jax.process_count()}
    loop = TrainLoop(config)
    loop.train_step(loop.take_samples())
    loop.maybe_publish()  # step 1: accepted, checkpointed, published
    accepted = _local_shards(loop.state)
    np.savez(out.replace(".json", ".accepted.npz"), **_host_params(loop.state.params))
    loop.train_step(loop.take_samples())
    loop.save_checkpoint()  # step 2, on the trajectory the refusal abandons
    loop.train_step(loop.take_samples())
    _corrupt(loop)
    report["refused_score"] = loop.gate.check(loop.state.params).candidate
    loop.maybe_publish()  # step 3: refused, rolled back to step 1
    _snapshot(loop, accepted, "rollback", out, report)
    if jax.process_index() == 0:
        loop.publisher.wait(timeout=60)
        report["published"] = sorted(d for d in os.listdir(loop.publisher.publish_dir)
                                     if d.startswith("v"))
    loop.train_step(loop.take_samples())  # step 2 again, on the samples after the discarded
    loop.save_checkpoint()
    loop.checkpointer.wait()
    report["after_retrain"] = {"checkpoints": loop.checkpointer.all_steps(),
                               "trained": _trained(loop),
                               "record": loop.checkpointer.gate_record()
                               if jax.process_index() == 0 else None}
    loop.train_step(loop.take_samples())
    _corrupt(loop)
    loop.save_checkpoint()  # step 3, saved before the gate decides: then the "crash"
    loop.close()

    config.trainer.resume = True
    resumed = TrainLoop(config)  # refuses step 3 and rolls back to step 1
    try:
        _snapshot(resumed, accepted, "resume", out, report)
    finally:
        resumed.close()
    with open(out, "w") as f:
        json.dump(report, f)
    print(json.dumps({"process": jax.process_index(), "done": True}))


def _worker(argv):
    mode, root, replay, probe, out = argv[:5]
    if mode == "one":
        _job(root, replay, probe, out)
    elif mode == "two":
        coordinator, process_id = argv[5:7]
        if process_id == "1":
            _lag_listings_in_rollbacks()
        _job(root, replay, probe, out, coordinator, 2, int(process_id))


# ---------------------------------------------------------------------------- test side
def _spawn(args, devices):
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT,
                            env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(procs) -> list[tuple[int, str, str]]:
    """Waits for every worker; kills all of them and fails when one outlives `TIMEOUT_S` (a
    rollback whose collectives do not match hangs rather than failing)."""
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            tails = []
            for q in procs:
                q.kill()
                tails.append(q.communicate()[1][-2000:])
            pytest.fail(f"a gated multi-host worker hung past {TIMEOUT_S} s; their stderr "
                        f"ends:\n" + "\n----\n".join(tails))
        results.append((p.returncode, out, err))
    return results


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The gated job run by 2 processes (4 devices each), then by 1 process (8 devices)."""
    from sample_factory import make_samples

    from clawjax.sources import write_replay

    tmp = tmp_path_factory.mktemp("multihost_gate")
    replay, probe = str(tmp / "replay.jsonl"), str(tmp / "probe.jsonl")
    write_replay(replay, make_samples(FILE_SAMPLES, seed=7, max_len=40))
    write_replay(probe, make_samples(6, seed=31, prefix="probe"))
    coordinator = f"127.0.0.1:{_free_port()}"
    two = _finish([_spawn(["two", str(tmp / "two"), replay, probe, str(tmp / f"two{i}.json"),
                           coordinator, str(i)], devices=4) for i in range(2)])
    for rc, _, err in two:
        assert rc == 0, err[-4000:]
    (rc, _, err), = _finish([_spawn(["one", str(tmp / "one"), replay, probe,
                                     str(tmp / "one.json")], devices=8)])
    assert rc == 0, err[-4000:]

    def load(name):
        with open(tmp / f"{name}.json") as f:
            report = json.load(f)
        report["params"] = {part: dict(np.load(tmp / f"{name}.{part}.npz"))
                            for part in ("accepted", "rollback", "resume")}
        return report

    return {"two": [load("two0"), load("two1")], "one": load("one"),
            "samples": [s.sample_id for s in make_samples(FILE_SAMPLES, seed=7, max_len=40)]}


def _by_step(*trained_logs) -> dict[int, list[str]]:
    """{step: the sorted ids all the given trained logs hold for it}."""
    steps: dict[int, list[str]] = {}
    for log in trained_logs:
        for step, ids in log:
            steps.setdefault(step, []).extend(ids)
    return {step: sorted(ids) for step, ids in steps.items()}


@pytest.mark.parametrize("phase", ["rollback", "resume"])
def test_both_processes_roll_back_to_the_accepted_state(jobs, phase):
    """The run-time rollback and the resume's: on each process step 1 again, its own shards of
    the whole train state (params, optimizer, step) equal to those it held when step 1 was
    accepted, the same checkpoints left on both, and the corrupted candidate well below the
    margin (the refusal was the gate's, not an accident)."""
    p0, p1 = (r[phase] for r in jobs["two"])
    assert [r["process"] for r in jobs["two"]] == [0, 1]
    assert all(r["of"] == 2 for r in jobs["two"]) and jobs["one"]["of"] == 1
    for p in (p0, p1):
        assert p["step"] == 1 and p["refusals"] == REFUSALS[phase], p
        assert p["local_diff"] == 0.0
        assert p["checkpoints"] == CHECKPOINTS_LEFT[phase]
        assert p["serving_score"] == p0["serving_score"]
    for r in jobs["two"]:
        assert r["refused_score"] < p0["serving_score"] - 0.5
    one = jobs["one"][phase]
    assert (one["step"], one["refusals"], one["checkpoints"]) == (1, REFUSALS[phase],
                                                                 CHECKPOINTS_LEFT[phase])
    assert one["serving_score"] == pytest.approx(p0["serving_score"], abs=1e-5)


@pytest.mark.parametrize("phase", ["rollback", "resume"])
def test_the_restored_parameters_match_across_processes_and_the_one_process_run(jobs, phase):
    two0, two1, one = (r["params"] for r in (*jobs["two"], jobs["one"]))
    assert set(two0[phase]) == set(one[phase]) and two0[phase]
    moved = 0.0
    for name, value in two0[phase].items():
        np.testing.assert_array_equal(value, two1[phase][name], err_msg=name)
        np.testing.assert_array_equal(value, two0["accepted"][name], err_msg=name)
        np.testing.assert_allclose(value, one[phase][name], rtol=0, atol=TOL, err_msg=name)
        moved = max(moved, float(np.max(np.abs(one["accepted"][name] - one[phase][name]))))
    assert moved == 0.0  # the one-process run also went back to exactly its step 1


def test_the_gate_records_match_the_one_process_run(jobs):
    """gate.json after the run-time rollback: step 1 accepted, no refusal pending, and what
    the run goes on with: the source past all 3 steps (24 of the file's samples) and the ids of
    step 3, trained on both processes and not yet acknowledged (gathered: 4 from each). After
    step 2 is trained again and checkpointed that carry is dropped; the resume's rollback
    records its own."""
    two, one = jobs["two"][0], jobs["one"]
    assert jobs["two"][1]["rollback"]["record"] is None  # process 0 writes the record
    rec, rec1 = two["rollback"]["record"], one["rollback"]["record"]
    carry = rec["after_rollback"]
    assert (rec["accepted_step"], rec["refused_step"], carry["step"]) == (1, None, 1)
    assert carry["source"]["position"] == 24 and not carry["source"].get("released")
    assert carry["unacked_ids"] == sorted(jobs["samples"][16:24])
    assert carry == rec1["after_rollback"]
    assert rec["serving_score"] == pytest.approx(rec1["serving_score"], abs=1e-5)
    assert two["published"] == one["published"] == ["v1"]
    for report in (two, one):
        after = report["after_retrain"]
        assert after["checkpoints"] == [0, 1, 2]
        assert "after_rollback" not in after["record"]
    resumed = two["resume"]["record"]
    assert resumed["after_rollback"]["step"] == 1
    assert resumed["after_rollback"]["source"]["position"] == 40  # 5 steps taken (1 looped)
    assert resumed["after_rollback"] == one["resume"]["record"]["after_rollback"]


def test_the_trained_logs_keep_the_surviving_steps_as_the_one_process_run(jobs):
    """Each process cuts its own trained log back to the restored step at each rollback; the
    step trained after the first rollback took the samples after the discarded ones (each
    process its share), exactly the ones the one-process run took."""
    samples = jobs["samples"]
    for phase in ("rollback", "resume"):
        logs = [r[phase]["trained"] for r in jobs["two"]]
        assert [[s for s, _ in log] for log in logs] == [[1], [1]], phase
        assert not set(logs[0][0][1]) & set(logs[1][0][1])
        assert _by_step(*logs) == _by_step(jobs["one"][phase]["trained"]) == \
            {1: sorted(samples[:8])}
    retrained = [r["after_retrain"]["trained"] for r in jobs["two"]]
    assert _by_step(*retrained) == _by_step(jobs["one"]["after_retrain"]["trained"]) == \
        {1: sorted(samples[:8]), 2: sorted(samples[24:32])}


if __name__ == "__main__":
    _worker(sys.argv[1:])
