"""The whole loop as `python -m clawjax.train` runs it by default, shortened by config: samples
flow proxy → judge → buffer → trainer, publishes reach the serving policy while it serves, and
any one loop's process can be killed and comes back without losing or retraining a sample."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clawjax import workdir as workdir_lib
from clawjax.local_stack import USER_MEMORY_SETTINGS
from clawjax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RUNS: list[subprocess.Popen] = []   # every run a test started, killed when the test ends


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test():
    """A failed test must not leave its run (and the run's children) on the suite's cores."""
    yield
    while _RUNS:
        proc = _RUNS.pop()
        if proc.poll() is None:
            proc.kill()   # its children get SIGTERM (parent-death signal)
            proc.communicate()


def short_run(workdir, *extra):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    for name in USER_MEMORY_SETTINGS:
        env.pop(name, None)  # the run's own choice is under test
    cmd = [sys.executable, "-m", "clawjax.train", f"--config.workdir={workdir}",
           "--config.warmstart.steps=20", "--config.warmstart.hidden_size=64",
           "--config.warmstart.intermediate_size=128", "--config.trainer.samples_per_step=8",
           "--config.eval.samples_per_task=1", "--config.eval.final_samples_per_task=2",
           "--config.eval.every_steps=2",
           "--config.publish.every_steps=2", "--config.checkpoint.every_steps=2",
           "--config.trainer.progress=False", "--config.rollout.agents=4", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _RUNS.append(proc)
    return proc


def trained_ids(workdir) -> list[str]:
    with open(os.path.join(workdir, "trained.jsonl")) as f:
        return [i for line in f if line.strip() for i in json.loads(line)["sample_ids"]]


def wait_for_step(workdir, step, proc, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        try:
            rows = read_metrics(str(workdir))
        except (FileNotFoundError, json.JSONDecodeError):
            rows = []
        if rows and rows[-1]["step"] >= step:
            return rows
        time.sleep(0.5)
    raise AssertionError(f"step {step} not reached in {timeout_s}s")


@pytest.mark.slow
def test_default_loop_end_to_end_with_killed_and_restarted_loops(tmp_path):
    workdir = tmp_path / "run"
    proc = short_run(workdir, "--config.trainer.steps=10")
    wait_for_step(workdir, 2, proc)
    # The policy server shares the accelerator with the trainer: it allocates on demand.
    with open(workdir / "pids.json") as f:
        server_pid = json.load(f)["server"]
    if os.path.exists(f"/proc/{server_pid}/environ"):  # Linux
        with open(f"/proc/{server_pid}/environ", "rb") as f:
            server_env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        assert server_env.get(b"XLA_PYTHON_CLIENT_PREALLOCATE") == b"false"
    # Kill the serving, rollout and buffer processes one after another: the supervisor brings
    # each back on its port (the buffer on its directory) and the loop goes on.
    for name in ("server", "proxy", "buffer"):
        with open(workdir / "pids.json") as f:
            pid = json.load(f)[name]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with open(workdir / "pids.json") as f:
                if json.load(f)[name] != pid:
                    break
            time.sleep(0.2)
        else:
            proc.kill()
            raise AssertionError(f"{name} was not restarted; the run's output:\n"
                                 f"{proc.communicate()[0][-4000:]}")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert "clawjax default run — summary" in out

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 10
    assert all(summary["restarts"][n] >= 1 for n in ("server", "proxy", "buffer"))
    rows = read_metrics(str(workdir))
    assert {"heldout_score", "loss", "reward_mean", "logp_gap", "hint_share"} <= set(rows[-1])
    assert sum(summary["emitted"].values()) > 0
    # At least two publishes reached the serving policy while agents were being served.
    evals = [json.loads(l) for l in (workdir / "eval.jsonl").read_text().split("\n") if l]
    versions = {e["version"] for e in evals}
    assert len(versions - {"default"}) >= 2, versions
    # The score is the mean of the per-task scores; the run's two ends use 2 answers per task.
    assert all(abs(sum(e["task_scores"]) / len(e["task_scores"]) - e["score"]) < 1e-9
               for e in evals)
    assert evals[0]["n"] == evals[-1]["n"] == 2 * len(evals[0]["task_scores"])
    assert summary["heldout_before_n"] == evals[0]["n"]
    assert "held-out change, paired by task" in out
    assert os.path.exists(workdir / "curve.png")
    assert os.listdir(workdir / "checkpoints")
    ids = trained_ids(workdir)
    assert len(ids) == len(set(ids)) == 10 * 8  # nothing trained twice, nothing lost

    # Kill the trainer (its children die with it) and resume: the lineage stays exactly-once.
    proc = short_run(workdir, "--config.trainer.steps=14", "--config.trainer.resume=True")
    try:
        wait_for_step(workdir, 12, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = short_run(workdir, "--config.trainer.steps=14", "--config.trainer.resume=True")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    ids = trained_ids(workdir)
    assert len(ids) == len(set(ids)) == 14 * 8

    # Everything the run wrote at the top of its workdir is either a run's own file (moved aside
    # by the next new run) or one of the caches kept for it: the warm start and the compiled
    # executables (the restarted processes above loaded theirs from it).
    kept = set(os.listdir(workdir)) - set(workdir_lib.run_entries(str(workdir)))
    assert kept == {"warmstart", "xla_cache"}
    assert os.listdir(workdir / "xla_cache")  # the train step compiles for seconds: kept
    # A new run in the same workdir (no resume), as a user re-running the command: the earlier
    # run's files go aside, and nothing of it is trained or logged again. Without the move the
    # new run trained the samples left in the earlier run's buffer, made by its last policy
    # (negative staleness), and appended its rows to the earlier logs.
    proc = short_run(workdir, "--config.trainer.steps=4")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert "the earlier run's files in" in out
    (archive,) = os.listdir(workdir / "previous")
    assert trained_ids(workdir / "previous" / archive) == ids
    rows = read_metrics(str(workdir))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert min(r["staleness_mean"] for r in rows) >= 0
    new_ids = trained_ids(workdir)
    assert len(new_ids) == len(set(new_ids)) == 4 * 8 and not set(new_ids) & set(ids)


@pytest.mark.parametrize("user_env, expected", [
    ({}, {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}),
    ({"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}, {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}),
    ({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".4"}, {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".4"}),
    ({"XLA_CLIENT_MEM_FRACTION": ".4"}, {"XLA_CLIENT_MEM_FRACTION": ".4"}),
])
def test_share_accelerator_asks_for_on_demand_memory_unless_the_user_chose(user_env, expected):
    """JAX's default (75% of a GPU at first use, per process) would leave the policy server no
    memory on the trainer's GPU; a user's own setting is kept as it is."""
    from clawjax.local_stack import share_accelerator

    environ = {"PATH": "/bin", **user_env}
    share_accelerator(environ)
    assert environ == {"PATH": "/bin", **expected}


@pytest.mark.parametrize("key,value", [("model.path", "/ckpt/MyQwen3"),
                                       ("buffer.address", "buffer-host:50051"),
                                       ("publish.urls", "http://fleet-0:30000"),
                                       ("replay", "samples.jsonl")])
def test_the_local_run_refuses_a_key_it_supplies_before_any_side_effect(tmp_path, key, value):
    from clawjax import config as config_lib
    from clawjax.configs import default
    from clawjax.default_run import check_local_keys, start_local

    config = default.get_config()
    check_local_keys(config)  # the default config itself passes
    config.workdir = str(tmp_path / "w")
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(config_lib.ConfigError,
                       match=rf"'{key}' = '{value}'.*rollout\.local=False"):
        start_local(config)
    assert not (tmp_path / "w").exists()
