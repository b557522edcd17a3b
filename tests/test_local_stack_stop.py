"""clawjax.local_stack: `stop()` and `stop_child` end a supervisor restart that is waiting for a
child's ready line, instead of waiting out the readiness timeout (180 s by default; 12 s here).
Real child processes: a module that prints READY on its first start and hangs before READY on
every later one, as a server stuck loading would."""

import os
import signal
import threading
import time

import pytest

from clawjax import local_stack
from clawjax.local_stack import Child, LocalStack

READINESS_TIMEOUT_S = 12.0   # what a restart would wait without the fix
PROMPT_S = 5.0               # a stop that ends the restart returns well within this

FLAKY = '''import os, sys, time
first, hung = sys.argv[1], sys.argv[2]
if not os.path.exists(first):
    open(first, "w").close()
    print("READY flaky", flush=True)
else:
    open(hung, "w").close()   # a restart: never ready
time.sleep(600)
'''


@pytest.fixture
def restarting(tmp_path, monkeypatch):
    """A started stack (its four processes left out) with one supervised child, `flaky`, that
    has been killed and whose restart is now waiting for a ready line that never comes.
    Yields (stack, the restarting Child)."""
    monkeypatch.setattr(Child.start, "__defaults__", (READINESS_TIMEOUT_S,))
    with monkeypatch.context() as patch:
        patch.setattr(LocalStack, "_child", lambda self, name, args, ready, env=None: "x:1")
        stack = LocalStack(str(tmp_path), "model").start()
    (tmp_path / "flaky.py").write_text(FLAKY)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    hung = tmp_path / "hung"
    procs = []
    try:
        stack.start_child("flaky", ["flaky", str(tmp_path / "first"), str(hung)], r"READY (\S+)")
        child = stack.children["flaky"]
        procs.append(child.proc)
        os.kill(child.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not hung.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hung.exists(), "the supervisor did not restart the killed child"
        procs.append(child.proc)
        yield stack, child
    finally:
        for proc in procs:   # whatever the outcome, no child outlives the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _timed(fn) -> float:
    """Seconds `fn()` took, run in a daemon thread that is given up on after the readiness
    timeout and a margin (so that a regression fails instead of hanging the suite)."""
    took = []

    def run():
        start = time.monotonic()
        fn()
        took.append(time.monotonic() - start)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(READINESS_TIMEOUT_S + 10)
    return took[0] if took else float("inf")


def test_stop_ends_a_restart_waiting_for_readiness(restarting):
    stack, child = restarting
    took = _timed(stack.stop)
    assert took < PROMPT_S, f"stop() took {took:.1f} s: it waited out the restart"
    assert child.proc.poll() is not None   # the half-started process is gone
    assert not stack._supervisor.is_alive()


def test_stop_child_ends_a_restart_waiting_for_readiness(restarting):
    stack, child = restarting
    try:
        took = _timed(lambda: stack.stop_child("flaky"))
        assert took < PROMPT_S, f"stop_child took {took:.1f} s: it waited out the restart"
        assert child.proc.poll() is not None and "flaky" not in stack.children
        assert stack._supervisor.is_alive()   # a cancelled restart does not end supervision
        time.sleep(1.5)   # three supervisor rounds: it is not started again
        assert child.proc.poll() is not None and stack.restarts() == {}
    finally:
        stack.stop()


def test_a_cancelled_child_is_not_started_again(tmp_path):
    """`cancel()` refuses every later start, before any process is forked."""
    child = Child("never", ["does_not_matter"], r"READY (\S+)", str(tmp_path / "never.log"))
    child.cancel()
    with pytest.raises(local_stack.StartCancelled, match="never: cancelled"):
        child.start(timeout_s=1)
    assert child.proc is None


def test_a_stopped_stack_refuses_new_children(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(LocalStack, "_child", lambda self, name, args, ready, env=None: "x:1")
        stack = LocalStack(str(tmp_path), "model").start()
    stack.stop()
    with pytest.raises(local_stack.StartCancelled, match="late: the stack is stopping"):
        stack.start_child("late", ["late"], r"READY (\S+)")
    assert stack.children == {}
