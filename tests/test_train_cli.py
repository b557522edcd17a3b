"""`python -m clawjax.train` as a user runs it: replay training, SIGKILL + exact resume (the
resumed process loading the killed one's compiled executables), config errors that name the
key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from clawjax.metrics import read_metrics
from clawjax.sources import write_replay
from sample_factory import make_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cmd(workdir, replay, steps, *extra):
    return [sys.executable, "-m", "clawjax.train", "--config=configs/tiny_cpu.py",
            f"--config.replay={replay}", f"--config.workdir={workdir}",
            f"--config.trainer.steps={steps}", "--config.trainer.samples_per_step=4",
            "--config.checkpoint.every_steps=3", "--config.trainer.progress=False", *extra]


def env():
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    e["JAX_PLATFORMS"] = "cpu"
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # keep every compile in xla_cache
    e.pop("JAX_COMPILATION_CACHE_DIR", None)
    return e


def final_params(workdir) -> dict:
    ckpt = os.path.join(workdir, "checkpoints")
    step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
    restored = ocp.StandardCheckpointer().restore(os.path.join(ckpt, str(step), "state"))
    flat = jax.tree_util.tree_flatten_with_path(restored["params"])[0]
    return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    replay = tmp_path / "replay.jsonl"
    write_replay(str(replay), make_samples(10, seed=11))
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    subprocess.run(train_cmd(straight, replay, 9), cwd=ROOT, env=env(), check=True,
                   capture_output=True)

    proc = subprocess.Popen(train_cmd(broken, replay, 9), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = broken / "checkpoints" / "6"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), "the run never reached its step-6 checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The resumed process loads what the killed one compiled (<workdir>/xla_cache); the parity
    # check below covers those loaded executables too.
    assert os.listdir(broken / "xla_cache")
    subprocess.run(train_cmd(broken, replay, 9, "--config.trainer.resume=True"), cwd=ROOT,
                   env=env(), check=True, capture_output=True)

    step_a, a = final_params(straight)
    step_b, b = final_params(broken)
    assert step_a == step_b == 9
    assert a.keys() == b.keys()
    diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert diff <= 1e-6, diff
    steps = [r["step"] for r in read_metrics(str(broken))]
    assert steps[-1] == 9


def test_resume_without_a_checkpoint_fails_clearly(tmp_path):
    replay = tmp_path / "replay.jsonl"
    write_replay(str(replay), make_samples(4, seed=12))
    out = subprocess.run(train_cmd(tmp_path / "none", replay, 2, "--config.trainer.resume=True"),
                         cwd=ROOT, env=env(), capture_output=True, text=True)
    assert out.returncode != 0
    assert "no checkpoint exists" in out.stderr


@pytest.mark.parametrize("flag,named", [
    ("--config.trainer.lrr=1e-3", "lrr"),
    ("--config.trainer.samples_per_step=0", "trainer.samples_per_step"),
])
def test_bad_config_flags_name_the_key(tmp_path, flag, named):
    replay = tmp_path / "replay.jsonl"
    write_replay(str(replay), make_samples(4, seed=13))
    out = subprocess.run(train_cmd(tmp_path / "bad", replay, 1, flag), cwd=ROOT, env=env(),
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert named in out.stderr


def test_malformed_replay_line_names_line_and_field(tmp_path):
    replay = tmp_path / "replay.jsonl"
    samples = make_samples(3, seed=14)
    write_replay(str(replay), samples)
    lines = replay.read_text().splitlines()
    lines[1] = lines[1].replace('"response_len":', '"response_len":9999,"x":')
    replay.write_text("\n".join(lines) + "\n")
    out = subprocess.run(train_cmd(tmp_path / "bad", replay, 1), cwd=ROOT, env=env(),
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "replay.jsonl:2" in out.stderr and samples[1].sample_id in out.stderr


def test_a_replay_that_cannot_fill_a_step_is_an_error_line(tmp_path):
    """Found only once training starts (rejections at admit), still exit 2 and `error:`."""
    replay = tmp_path / "replay.jsonl"
    write_replay(str(replay), make_samples(7, seed=1, prefix="short") +
                 make_samples(3, seed=2, min_len=300, max_len=400, prefix="long"))
    cmd = train_cmd(tmp_path / "w", replay, 2, "--config.trainer.samples_per_step=8")
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config key 'replay'") and "found 7 admissible" in last, last


def test_a_replay_smaller_than_one_step_is_an_error_line(tmp_path):
    """Found at start-up (`make_source`): exit 2 with one `error:` line naming `replay`, not a
    traceback."""
    replay = tmp_path / "replay.jsonl"
    write_replay(str(replay), make_samples(3, seed=4))
    out = subprocess.run(train_cmd(tmp_path / "w", replay, 2), cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config key 'replay'") and "it holds 3" in last, last


def run_train(*args, timeout=120):
    """`python -m clawjax.train ARGS`; a run that does not end within `timeout` fails the test."""
    try:
        return subprocess.run([sys.executable, "-m", "clawjax.train", *args], cwd=ROOT,
                              env=env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"python -m clawjax.train {' '.join(args)} still ran after {timeout} s: "
                    f"{(e.stderr or b'')[-2000:]!r}")


def assert_refused(out, *named):
    """Exit 2 with one `error: ...` line naming `named`, no traceback."""
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    for name in named:
        assert name in lines[0], (name, lines[0])


@pytest.mark.parametrize("flag,named", [
    ("--config.publish.nope=x", ["unknown config key publish.nope", "every_steps", "urls"]),
    ("--config.trainer.lrr=1e-3", ["unknown config key trainer.lrr", "did you mean trainer.lr?"]),
    ("--config.nope.deeper=1", ["unknown config key nope", "publish"]),
])
def test_unknown_config_key_is_one_line_and_exit_2(tmp_path, flag, named):
    out = run_train("--config=configs/tiny_cpu.py", f"--config.workdir={tmp_path / 'w'}", flag)
    assert_refused(out, *named)
    assert not (tmp_path / "w").exists()


def test_bad_value_on_the_default_path_is_refused_before_touching_the_workdir(tmp_path):
    """The default (local) run moves an earlier run's files aside and warm-starts: a bad value
    must stop it before either (the warm start is kept tiny in case it does not)."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
    out = run_train(f"--config.workdir={workdir}", "--config.method=foo",
                    "--config.warmstart.steps=1", "--config.warmstart.examples=50")
    assert_refused(out, "'method' = 'foo'", "'rl', 'opd', 'combine'")
    assert sorted(os.listdir(workdir)) == ["metrics.jsonl"]  # no previous/, warmstart/, xla_cache/


@pytest.mark.parametrize("extra,named", [
    (["--config.distributed.enabled=True", "--config.distributed.local_device_ids=0,x"],
     ["'distributed.local_device_ids' = '0,x'"]),
    (["--config.trainer.max_staleness=1"], ["'trainer.max_staleness' = 1", "replay"]),
    (["--config.replay=/nonexistent/r.jsonl"], ["'replay' = '/nonexistent/r.jsonl'",
                                                "an existing JSONL file"]),
    (["--config.publish.every_steps=1", "--config.gate.enabled=True",
      "--config.gate.probe=/nonexistent/p.jsonl"], ["'gate.probe' = '/nonexistent/p.jsonl'"]),
    (["--config.model.path=/nonexistent/model"], ["'model.path' = '/nonexistent/model'",
                                                  "config.json"]),
    (["--config.publish.every_steps=1", "--config.publish.dir={replay}"],
     ["'publish.dir' = ", "a directory"]),
    (["--config.trainer.resume=True"], ["'trainer.resume' = True", "no checkpoint"]),
    (["--config.publish.every_steps=1", "--config.gate.enabled=True"],
     ["'gate.probe' = ''", "gate.enabled"]),
    (["--config.publish.every_steps=1", "--config.publish.keep=0"],
     ["'publish.keep' = 0", "an integer ≥ 1"]),
], ids=["local-device-ids", "staleness", "replay", "gate-probe", "model-path", "publish-dir",
        "resume", "gate-without-probe", "publish-keep"])
def test_bad_values_are_refused_before_any_side_effect(tmp_path, extra, named):
    """Each a single `error:` line naming the key, exit 2, nothing created (files and
    directories that are not there, or not of their kind, included: they ended in tracebacks,
    after the compilation cache was made, and the gate probe's named `replay`)."""
    replay = tmp_path / "replay.jsonl"
    write_replay(str(replay), make_samples(4, seed=15))
    extra = [flag.format(replay=replay) for flag in extra]
    out = run_train(*train_cmd(tmp_path / "w", replay, 1, *extra)[3:])
    assert_refused(out, *named)
    assert not (tmp_path / "w").exists()  # not even xla_cache/


def test_a_refused_workdir_gets_no_compile_cache(tmp_path):
    """`require_fresh` says "nothing was changed": the compilation cache is not created first."""
    replay = tmp_path / "replay.jsonl"
    write_replay(str(replay), make_samples(4, seed=16))
    workdir = tmp_path / "w"
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    out = run_train(*train_cmd(workdir, replay, 1)[3:])
    assert_refused(out, "'trainer.resume' = False", "nothing was changed")
    assert sorted(os.listdir(workdir)) == ["checkpoints"]


def test_no_sample_source_is_refused_instead_of_waiting_forever(tmp_path):
    out = run_train("--config=configs/tiny_cpu.py", f"--config.workdir={tmp_path / 'w'}",
                    "--config.trainer.take_timeout_s=1", timeout=90)
    assert_refused(out, "'replay' = ''", "buffer.address")
    assert not (tmp_path / "w").exists()


def test_the_local_run_refuses_a_key_it_supplies_before_touching_the_workdir(tmp_path):
    """The default (local) run supplies model.path, buffer.address, publish.urls and the
    samples: a user's value for one is refused at once, not silently replaced after the warm
    start (the warm start is kept tiny in case it is not)."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
    for flag, named in (("--config.buffer.address=h:1", "'buffer.address' = 'h:1'"),
                        ("--config.replay=r.jsonl", "'replay' = 'r.jsonl'")):
        out = run_train(f"--config.workdir={workdir}", flag, "--config.warmstart.steps=1",
                        "--config.warmstart.examples=50")
        assert_refused(out, named, "--config.rollout.local=False")
        assert os.listdir(workdir) == ["metrics.jsonl"]   # nothing moved aside, no warm start


@pytest.mark.parametrize("args,named", [
    (["--config=configs/tiny_cpu.py", "--config.trainer.steps=abc"],
     ["'trainer.steps' = 'abc'", "an integer"]),
    (["--config=configs/tiny_cpu.py", "--config.trainer.lr=fast"],
     ["'trainer.lr' = 'fast'", "a number"]),
    (["--config=configs/tiny_cpu.py", "--config.trainer.resume=maybe"],
     ["'trainer.resume' = 'maybe'", "True or False"]),
    (["--config=configs/nope.py"], ["--config = 'configs/nope.py'", "No such file"]),
], ids=["int", "float", "bool", "missing-config-file"])
def test_a_flag_value_absl_cannot_parse_is_refused_naming_it(tmp_path, args, named):
    """A value of the wrong type and a config file that is not there: exit 2 with one `error:`
    line naming the flag and the value (not absl's `FATAL Flags parsing error`, exit 1, nor an
    OSError traceback), nothing created."""
    out = run_train(*args, f"--config.workdir={tmp_path / 'w'}")
    assert_refused(out, *named)
    assert not (tmp_path / "w").exists()


def run_sequential(*args, timeout=120):
    """`python -m clawjax.sequential_run ARGS` (the default run's config)."""
    return subprocess.run([sys.executable, "-m", "clawjax.sequential_run", *args], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("flag,named", [
    ("--config.replay=r.jsonl", ["'replay' = 'r.jsonl'", "--config.rollout.local=False"]),
    ("--config.method=foo", ["'method' = 'foo'", "'rl', 'opd', 'combine'"]),
    ("--config.trainer.steps=abc", ["'trainer.steps' = 'abc'"]),
    ("--config.rollout.local=False", ["'rollout.local' = False"]),
], ids=["local-key", "method", "flag-type", "not-local"])
def test_the_sequential_run_refuses_bad_config_as_train_does(tmp_path, flag, named):
    """`python -m clawjax.sequential_run` goes through `clawjax.train`'s start-up checks: exit
    2, one `error:` line, the earlier run's files not moved aside and no warm start (kept tiny
    in case there is one)."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
    out = run_sequential(f"--config.workdir={workdir}", flag, "--config.warmstart.steps=2",
                         "--config.warmstart.examples=50", "--config.trainer.progress=False")
    assert_refused(out, *named)
    assert os.listdir(workdir) == ["metrics.jsonl"]


@pytest.mark.parametrize("extra,named", [
    (["--config.warmstart.examples=10"], ["'warmstart.examples' = 10", "warmstart.batch_size"]),
    (["--config.warmstart.heldout_share=1.0"], ["'warmstart.heldout_share' = 1.0"]),
    (["--config.eval.every_steps=0"], ["'eval.every_steps' = 0", "an integer ≥ 1"]),
    (["--config.trainer.resume=True"], ["'trainer.resume' = True", "no checkpoint"]),
    (["--config.publish.dir={published}"], ["'publish.dir' = ", "['v4']"]),
], ids=["warmstart-examples", "warmstart-heldout", "eval-every", "resume", "publish-dir"])
def test_the_local_run_refuses_bad_values_before_any_side_effect(tmp_path, extra, named):
    """The default (local) run: refused before the earlier run's files are moved aside and
    before the warm start (kept tiny in case it is not): warm-start values the warm start would
    fail on, an `eval.every_steps` that re-scores the same version forever, `trainer.resume`
    with no checkpoint to continue, a `publish.dir` outside the workdir that holds an earlier
    run's versions (not moved aside by the new run)."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
    published = tmp_path / "served"
    (published / "v4").mkdir(parents=True)
    extra = [flag.format(published=published) for flag in extra]
    out = run_train(f"--config.workdir={workdir}", "--config.warmstart.steps=2",
                    "--config.warmstart.examples=50", "--config.trainer.steps=1",
                    "--config.eval.final_samples_per_task=1", "--config.rollout.agents=1",
                    "--config.trainer.progress=False", *extra)
    assert_refused(out, *named)
    assert os.listdir(workdir) == ["metrics.jsonl"]
    assert os.listdir(published) == ["v4"]
