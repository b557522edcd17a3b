"""clawjax.local_stack: a child's environment overlay (how the policy server gets its own
JAX_PLATFORMS under `rollout.server_platforms`), and a supervisor that outlives a failed
restart."""

import json
import os
import signal
import subprocess
import time

import pytest

from clawjax import config as config_lib
from clawjax import local_stack
from clawjax.local_stack import Child, LocalStack

PROBE = '''import os
print("READY http://probe JAX_PLATFORMS=" + os.environ.get("JAX_PLATFORMS", "<unset>")
      + " PARENT_ONLY=" + os.environ.get("CLAWJAX_TEST_PARENT_ONLY", "<unset>"), flush=True)
import time
time.sleep(60)
'''


def _probe_line(tmp_path, env: dict) -> str:
    (tmp_path / "envprobe.py").write_text(PROBE)
    child = Child("probe", ["envprobe"], r"(READY .*)", str(tmp_path / "probe.log"),
                  dict(env, PYTHONPATH=str(tmp_path)))
    try:
        return child.start(timeout_s=60)
    finally:
        child.stop()


def test_child_env_is_laid_over_the_parents(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("CLAWJAX_TEST_PARENT_ONLY", "kept")
    line = _probe_line(tmp_path, {"JAX_PLATFORMS": "cuda"})
    assert "JAX_PLATFORMS=cuda" in line  # the overlay wins
    assert "PARENT_ONLY=kept" in line  # the rest is inherited
    line = _probe_line(tmp_path, {})
    assert "JAX_PLATFORMS=cpu" in line


def test_the_server_child_gets_the_server_platforms(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(LocalStack, "_child",
                        lambda self, name, args, ready, env=None: started.append((name, env))
                        or "127.0.0.1:1")
    LocalStack(str(tmp_path), "model", server_platforms="cuda").start().stop()
    envs = dict(started)
    assert envs["server"] == {"JAX_PLATFORMS": "cuda"}
    assert envs["buffer"] is None and envs["proxy"] is None and envs["judge"] is None
    started.clear()
    LocalStack(str(tmp_path), "model").start().stop()
    assert dict(started)["server"] is None  # "" = inherited


def test_the_proxy_child_asks_for_teacher_topk_only_when_set(tmp_path, monkeypatch):
    started = {}
    monkeypatch.setattr(LocalStack, "_child",
                        lambda self, name, args, ready, env=None: started.update({name: args})
                        or "127.0.0.1:1")
    LocalStack(str(tmp_path), "model", teacher_topk=8).start().stop()
    args = started["proxy"]
    assert args[args.index("--teacher-topk") + 1] == "8"
    LocalStack(str(tmp_path), "model").start().stop()
    assert "--teacher-topk" not in started["proxy"]


@pytest.mark.parametrize("updates,ok", [({}, True), ({"rollout.teacher_topk": 8}, True),
                                        ({"rollout.teacher_topk": -1}, False),
                                        ({"rollout.teacher_topk": 1025}, False),
                                        ({"loss.topk_coef": 0.5}, True),  # not a local run
                                        ({"loss.topk_coef": 0.5, "rollout.local": True}, False),
                                        ({"loss.topk_coef": 0.5, "rollout.local": True,
                                          "rollout.teacher_topk": 4}, True)])
def test_teacher_topk_is_validated(updates, ok):
    config = config_lib.base_config()
    config.model.path = "m"
    for key, value in updates.items():
        group, name = key.split(".")
        setattr(config[group], name, value)
    if ok:
        config_lib.validate(config)
    else:
        with pytest.raises(config_lib.ConfigError, match="rollout.teacher_topk"):
            config_lib.validate(config)


@pytest.mark.parametrize("value,ok", [("", True), ("cpu", True), ("cuda,cpu", True),
                                      ("gpu0", False), ("cuda;cpu", False)])
def test_server_platforms_are_validated(value, ok):
    config = config_lib.base_config()
    config.model.path = "m"
    config.rollout.server_platforms = value
    if ok:
        config_lib.validate(config)
    else:
        with pytest.raises(config_lib.ConfigError, match="rollout.server_platforms"):
            config_lib.validate(config)


def test_the_supervisor_outlives_a_restart_that_fails_to_fork(tmp_path, monkeypatch):
    """A restart whose Popen raises (here OSError, as a failed fork does; not the RuntimeError of
    a child that did not come up) is logged and tried again: the child comes back, the
    supervisor thread lives on, and the failed attempt is not counted as a restart."""
    with monkeypatch.context() as patch:  # the four stack processes are not under test here
        patch.setattr(LocalStack, "_child", lambda self, name, args, ready, env=None: "x:1")
        stack = LocalStack(str(tmp_path), "model").start()
    (tmp_path / "sleeper.py").write_text(
        "import time\nprint('READY sleeper', flush=True)\ntime.sleep(120)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    real_popen, failures = subprocess.Popen, []

    def popen_failing_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise BlockingIOError(11, "Resource temporarily unavailable (fork)")
        return real_popen(*args, **kwargs)

    try:
        stack.start_child("sleeper", ["sleeper"], r"READY (sleeper)")
        pids = lambda: json.loads((tmp_path / "pids.json").read_text())
        first = pids()["sleeper"]
        monkeypatch.setattr(local_stack.subprocess, "Popen", popen_failing_once)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while pids().get("sleeper") in (None, first) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert failures == [1]
        assert pids()["sleeper"] != first and stack.restarts() == {"sleeper": 1}
        assert stack._supervisor.is_alive()
    finally:
        stack.stop()


def _stack_without_its_four(tmp_path, monkeypatch) -> LocalStack:
    """A started stack (its supervisor running) whose four processes are not started: the
    children under test are added with `start_child`."""
    with monkeypatch.context() as patch:
        patch.setattr(LocalStack, "_child", lambda self, name, args, ready, env=None: "x:1")
        stack = LocalStack(str(tmp_path), "model").start()
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return stack


def _counting_popen(monkeypatch, delay_s: float = 0.0) -> list:
    """Counts (and delays by `delay_s`) every process the stack starts."""
    real_popen, started = subprocess.Popen, []

    def popen(*args, **kwargs):
        started.append(1)
        time.sleep(delay_s)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(local_stack.subprocess, "Popen", popen)
    return started


def test_a_child_being_forked_is_not_the_supervisors_yet(tmp_path, monkeypatch):
    """`start_child` registers a child before its process exists (so that `stop()` reaches it).
    A supervisor round in that window (here a fork slowed to 1.5 s: three rounds) used to read
    the missing process's exit code, raise, and end the supervisor thread, so no child was
    restarted for the rest of the run (seen in a `bench methods` run). It must leave the child
    alone, and supervise it once started."""
    stack = _stack_without_its_four(tmp_path, monkeypatch)
    (tmp_path / "sleeper.py").write_text(
        "import time\nprint('READY sleeper', flush=True)\ntime.sleep(120)\n")
    started = _counting_popen(monkeypatch, delay_s=1.5)
    try:
        stack.start_child("sleeper", ["sleeper"], r"READY (sleeper)")
        time.sleep(1.0)  # two more rounds after it came up
        assert stack._supervisor.is_alive()
        assert len(started) == 1 and stack.restarts() == {"sleeper": 0}
        first = json.loads((tmp_path / "pids.json").read_text())["sleeper"]
        os.kill(first, signal.SIGKILL)  # now it is supervised: restarted
        deadline = time.monotonic() + 60
        while stack.restarts()["sleeper"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stack.restarts() == {"sleeper": 1} and len(started) == 2
    finally:
        stack.stop()


def test_a_child_whose_first_start_failed_is_retried_by_start_child_alone(tmp_path, monkeypatch):
    """A child that exits before it is ready is retried by `start_child` (after 3 s); the
    supervisor must not start it meanwhile too: it did, and the retry then replaced the process
    the supervisor had started, which ran on unsupervised and was never stopped."""
    stack = _stack_without_its_four(tmp_path, monkeypatch)
    (tmp_path / "flaky.py").write_text(
        "import os, sys, time\n"
        f"marker = {str(tmp_path / 'tried')!r}\n"
        "if not os.path.exists(marker):\n"
        "    open(marker, 'w').close()\n"
        "    sys.exit(3)\n"
        "print('READY flaky', flush=True)\ntime.sleep(120)\n")
    started = _counting_popen(monkeypatch)
    try:
        assert stack.start_child("flaky", ["flaky"], r"READY (flaky)") == "flaky"
        time.sleep(1.0)
        assert len(started) == 2 and stack.restarts() == {"flaky": 0}
        assert stack.children["flaky"].alive()
    finally:
        stack.stop()


def test_a_child_that_never_starts_is_forgotten(tmp_path, monkeypatch):
    """Three failed starts: `start_child` raises and the name is free again (not left behind,
    unstarted, as a child that blocks its name)."""
    stack = _stack_without_its_four(tmp_path, monkeypatch)
    (tmp_path / "dud.py").write_text("import sys\nsys.exit(4)\n")
    monkeypatch.setattr(local_stack.time, "sleep", lambda s: None)  # the 3 s between tries
    try:
        with pytest.raises(RuntimeError, match="dud did not start"):
            stack.start_child("dud", ["dud"], r"READY (dud)")
        assert "dud" not in stack.children and stack._supervisor.is_alive()
    finally:
        stack.stop()
