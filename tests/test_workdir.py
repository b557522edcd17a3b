"""`clawjax.workdir`: a new run never mixes with the files an earlier run left in its workdir.
The trainer refuses such a workdir without `trainer.resume` (nothing changed); the local default
run moves the earlier files aside, keeping the warm-start cache and anything that is not a
run's own. The whole default run twice in one workdir is covered in tests/test_default_run.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clawjax import workdir as workdir_lib
from clawjax.buffer.wal import WriteAheadLog
from clawjax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a default run leaves (tests/test_default_run.py checks the list against a real run),
# plus a second process's logs of a multi-host run.
RUN_FILES = ["buffer/wal/LOCK", "buffer/wal/wal-000001.log", "checkpoints/10/state", "publish/v10/x",
             "tensorboard/events", "logs/server.log", "metrics.jsonl", "metrics.process1.jsonl",
             "trained.jsonl", "trained.process1.jsonl", "eval.jsonl", "summary.json",
             "curve.png", "gate_probe.jsonl", "pids.json", "rejected.jsonl"]
KEPT_FILES = ["warmstart/config.json", "xla_cache/jit_step-cache", "run.log", "notes.txt",
              "previous/old/metrics.jsonl"]


def make_files(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)


def test_archive_moves_exactly_the_run_files_and_keeps_the_rest(tmp_path):
    make_files(tmp_path, RUN_FILES + KEPT_FILES)
    moved = workdir_lib.archive_previous_run(str(tmp_path))
    assert moved is not None and os.path.dirname(moved) == str(tmp_path / "previous")
    for name in RUN_FILES:  # moved with their contents, nothing deleted
        assert not (tmp_path / name).exists(), name
        assert open(os.path.join(moved, name)).read() == name
    for name in KEPT_FILES:
        assert (tmp_path / name).read_text() == name
    assert workdir_lib.run_entries(str(tmp_path)) == []
    assert workdir_lib.archive_previous_run(str(tmp_path)) is None  # nothing left to move
    make_files(tmp_path, ["metrics.jsonl"])  # a second archive in the same second: its own dir
    again = workdir_lib.archive_previous_run(str(tmp_path))
    assert again != moved and os.path.exists(os.path.join(again, "metrics.jsonl"))
    assert workdir_lib.archive_previous_run(str(tmp_path / "missing")) is None


def test_archive_refuses_a_workdir_whose_buffer_is_live(tmp_path):
    make_files(tmp_path, RUN_FILES)
    log = WriteAheadLog(tmp_path / "buffer")  # holds its lock, as a running buffer server does
    try:
        with pytest.raises(workdir_lib.WorkdirInUseError, match="in use by another run"):
            workdir_lib.archive_previous_run(str(tmp_path))
    finally:
        log.close()
    assert workdir_lib.run_entries(str(tmp_path)) == sorted(
        {n.split("/")[0] for n in RUN_FILES})  # nothing moved
    assert workdir_lib.archive_previous_run(str(tmp_path)) is not None  # free again: moves


def test_require_fresh_names_the_key_and_the_latest_step(tmp_path):
    workdir_lib.require_fresh(str(tmp_path), resume=False)  # empty: fine
    make_files(tmp_path, ["checkpoints/8/x", "checkpoints/10/x", "checkpoints/10.orbax-tmp/x"])
    assert workdir_lib.checkpoint_steps(str(tmp_path)) == [8, 10]
    with pytest.raises(ConfigError, match=r"'trainer.resume' = False, expected True to continue "
                                          r"the earlier run in .* step 10\)"):
        workdir_lib.require_fresh(str(tmp_path), resume=False)
    workdir_lib.require_fresh(str(tmp_path), resume=True)


def test_require_fresh_refuses_a_workdir_with_an_earlier_runs_published_versions(tmp_path):
    """A run that died before its first checkpoint leaves only `publish/v*`: a new run there
    would mix its versions with the dead run's (and had them pruned first)."""
    make_files(tmp_path, ["publish/.staging/v9-abc/x", "publish/notes.txt"])
    workdir_lib.require_fresh(str(tmp_path), resume=False)  # no version: fine
    make_files(tmp_path, ["publish/v6/config.json", "publish/v8/config.json"])
    assert workdir_lib.published_versions(str(tmp_path)) == [6, 8]
    with pytest.raises(ConfigError, match=r"'workdir' = .*, expected a workdir without an "
                                          r"earlier run's files: .*publish holds its published "
                                          r"versions \['v6', 'v8'\]"):
        workdir_lib.require_fresh(str(tmp_path), resume=False)
    assert workdir_lib.published_versions(str(tmp_path)) == [6, 8]  # nothing changed
    workdir_lib.require_fresh(str(tmp_path), resume=True)


def test_require_fresh_refuses_the_logs_of_a_run_that_left_no_checkpoint(tmp_path):
    """A run killed before its first checkpoint (and publishing nothing) leaves its logs: a new
    run there appended to them (metrics and trained steps 1, 2, 1, 2). Each process checks its
    own logs (`logs`): another process's are not its business."""
    make_files(tmp_path, ["checkpoints/.keep", "tensorboard/events", "eval.jsonl"])
    workdir_lib.require_fresh(str(tmp_path), resume=False)   # no log of a TrainLoop: fine
    make_files(tmp_path, ["metrics.jsonl", "trained.jsonl"])
    with pytest.raises(ConfigError, match=r"'workdir' = .*, expected a workdir without an "
                                          r"earlier run's files: it holds its logs "
                                          r"\['metrics.jsonl', 'trained.jsonl'\]"):
        workdir_lib.require_fresh(str(tmp_path), resume=False)
    workdir_lib.require_fresh(str(tmp_path), resume=False,
                              logs=("metrics.process1.jsonl", "trained.process1.jsonl"))
    workdir_lib.require_fresh(str(tmp_path), resume=True)


def test_check_start_refuses_a_publish_dir_with_an_earlier_runs_versions(tmp_path):
    """`publish.dir` outside the workdir: a fresh workdir does not make it fresh. A new run there
    would number its versions among the earlier run's (v3 < the earlier v40)."""
    from clawjax import train
    from clawjax.config import base_config

    elsewhere = tmp_path / "served"
    make_files(elsewhere, ["v40/config.json", ".staging/v9-abc/x"])
    replay = tmp_path / "samples.jsonl"
    replay.write_text("")
    config = base_config()
    config.workdir, config.replay = str(tmp_path / "run"), str(replay)
    config.publish.dir, config.publish.every_steps = str(elsewhere), 3
    with pytest.raises(ConfigError, match=r"'publish.dir' = '.*served', expected a directory "
                                          r"without an earlier run's published versions for a "
                                          r"new run: it holds \['v40'\]"):
        train.check_start(config)
    assert workdir_lib.versions_in(str(elsewhere)) == [40]  # nothing changed
    assert not os.path.exists(config.workdir)
    config.publish.every_steps = 0  # not publishing: nothing to mix with
    train.check_start(config)
    config.publish.every_steps = 3
    config.publish.dir = str(tmp_path / "new")  # not there yet
    train.check_start(config)
    config.publish.dir = str(elsewhere)
    make_files(tmp_path / "run", ["checkpoints/5/x"])   # the earlier run's checkpoint
    config.trainer.resume = True  # continuing the earlier run: its versions are its own
    train.check_start(config)


def test_training_twice_in_a_workdir_without_resume_is_refused_and_changes_nothing(tmp_path):
    """README's replay example run twice: the second run stops with the message before writing
    anything; with `trainer.resume=True` it continues instead."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from sample_factory import make_samples
    from clawjax.sources import write_replay

    replay = tmp_path / "samples.jsonl"
    write_replay(str(replay), make_samples(8, seed=1))
    workdir = tmp_path / "run"

    def train(*extra):
        cmd = [sys.executable, "-m", "clawjax.train", f"--config={ROOT}/configs/tiny_cpu.py",
               f"--config.replay={replay}", f"--config.workdir={workdir}",
               "--config.trainer.steps=2", "--config.trainer.progress=False", *extra]
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    first = train()
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    second = train()
    assert second.returncode != 0
    assert "'trainer.resume' = False, expected True to continue the earlier run" in second.stderr
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before
    resumed = train("--config.trainer.resume=True", "--config.trainer.steps=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert workdir_lib.checkpoint_steps(str(workdir))[-1] == 3


def local_config(tmp_path):
    from clawjax.configs import default

    config = default.get_config()
    config.workdir = str(tmp_path / "run")
    return config


def test_check_start_refuses_a_local_resume_with_no_checkpoint(tmp_path):
    """The local run keeps its workdir as it is on `trainer.resume`: with no checkpoint there it
    got through the warm start, the stack and the baseline evaluation and then failed."""
    from clawjax import train

    config = local_config(tmp_path)
    config.trainer.resume = True
    with pytest.raises(ConfigError, match=r"'trainer.resume' = True, expected False for a new "
                                          r"run: no checkpoint exists under .*run"):
        train.check_start(config)
    assert not os.path.exists(config.workdir)
    make_files(tmp_path / "run", ["checkpoints/4/x", "publish/v4/x"])
    train.check_start(config)   # continues it, its published versions too
    config.publish.dir = str(tmp_path / "served")
    make_files(tmp_path / "served", ["v4/x"])
    train.check_start(config)   # resuming: the versions are the run's own


def test_check_start_refuses_a_local_publish_dir_the_new_run_does_not_move_aside(tmp_path):
    """A new local run moves the earlier run's files aside (`archive_previous_run`), so its
    checkpoints, logs and `publish/` are no reason to refuse; a `publish.dir` the archive does
    not move (outside the workdir, or inside it but not a run entry) holding versions is."""
    from clawjax import train

    config = local_config(tmp_path)
    make_files(tmp_path / "run", ["checkpoints/4/x", "publish/v4/x", "metrics.jsonl"])
    train.check_start(config)                           # publish.dir "": workdir/publish
    config.publish.dir = str(tmp_path / "run" / "publish")
    train.check_start(config)                           # the same, named
    for holding in (tmp_path / "served", tmp_path / "run" / "served", tmp_path / "run"):
        make_files(holding, ["v7/x"])
        config.publish.dir = str(holding)
        with pytest.raises(ConfigError, match=r"'publish.dir' = .*it holds \['v7'\]"):
            train.check_start(config)
    config.publish.every_steps = 0                      # not publishing: nothing to mix with
    train.check_start(config)
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints", "metrics.jsonl", "publish",
                                                    "served", "v7"]   # nothing moved
