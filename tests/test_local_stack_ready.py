"""Waiting for a child's ready line (`clawjax.local_stack.Child.start`,
`clawjax.buffer.testing.ServerProcess.start`, both through `clawjax.pipe_lines.PipeLines`):
a partial line cannot hold the wait past its deadline, and a ready line that arrives in the
same read as the line before it is found. Real child processes, started from small modules."""

import os
import subprocess
import sys
import threading
import time

import pytest

from clawjax.buffer.testing import ServerProcess
from clawjax.local_stack import Child

PARTIAL = '''import sys, time
sys.stdout.write("loading weights ..."); sys.stdout.flush()   # no newline, then nothing
time.sleep(600)
'''
TWO_LINES = '''import os, sys, time
os.write(1, sys.argv[1].encode().replace(b"|", b"\\n"))   # a banner and READY in one write
time.sleep(600)
'''
CHATTY = '''import os, sys, time
print("READY chatty", flush=True)
for _ in range(64):   # 4 MiB: far more than a pipe holds, so only a drain lets it finish
    sys.stdout.write("x" * 65535 + "\\n")
sys.stdout.flush()
open(sys.argv[1], "w").close()
time.sleep(600)
'''
SLOW_NEWLINE = '''import sys, time
sys.stdout.write("READY http://127.0.0.1:"); sys.stdout.flush()   # its port comes later
time.sleep(0.5)
sys.stdout.write("3\\n"); sys.stdout.flush()
time.sleep(600)
'''


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """Writes the child modules above into `tmp_path`, importable by the children."""
    for name, text in (("partial", PARTIAL), ("two_lines", TWO_LINES), ("chatty", CHATTY),
                       ("slow_newline", SLOW_NEWLINE)):
        (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return tmp_path


def _bounded(start, proc_of, limit_s: float):
    """Runs `start()` in a daemon thread for at most `limit_s`; returns (what it returned or
    raised, seconds), or (None, inf) if it was still blocked. Kills the process `proc_of()`
    either way, so that a blocked read ends and nothing outlives the test. (A `Child` started
    in that thread gets SIGTERM when the thread ends: its parent death signal.)"""
    out = {}

    def run():
        began = time.monotonic()
        try:
            out["result"] = start()
        except Exception as e:  # noqa: BLE001 (the caller asserts on it)
            out["result"] = e
        out["s"] = time.monotonic() - began

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    proc = proc_of()
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    thread.join(5)
    return (out["result"], out["s"]) if "s" in out and out["s"] <= limit_s else (None, float("inf"))


def _child(tmp_path, name: str, *args: str) -> Child:
    return Child(name, [name, *args], r"READY (\S+)", str(tmp_path / f"{name}.log"))


def test_a_partial_line_does_not_hold_the_start_past_its_deadline(modules):
    child = _child(modules, "partial")
    result, took = _bounded(lambda: child.start(timeout_s=2), lambda: child.proc, limit_s=8)
    assert took < 6, "Child.start blocked on a partial line past its deadline"
    assert isinstance(result, RuntimeError) and "partial did not start" in str(result)
    assert child.proc.poll() is not None   # the start stopped it


@pytest.mark.parametrize("module, args, address, within_s", [
    ("two_lines", ("some banner|READY http://127.0.0.1:2|",), "http://127.0.0.1:2", 3),  # one write
    ("slow_newline", (), "http://127.0.0.1:3", 4),   # the ready line finished by a later write
])
def test_a_ready_line_is_found_however_the_writes_split_it(modules, module, args, address,
                                                          within_s):
    child = _child(modules, module, *args)
    try:
        result, took = _bounded(lambda: child.start(timeout_s=5), lambda: None, limit_s=10)
        assert result == address and took < within_s, (result, took)
    finally:
        child.stop()


def test_output_after_the_ready_line_is_drained(modules):
    """A child that writes far more than a pipe holds after READY is not blocked by it."""
    done = modules / "done"
    child = _child(modules, "chatty", str(done))
    try:
        assert child.start(timeout_s=10) == "chatty"
        deadline = time.monotonic() + 15
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert done.exists(), "the child blocked writing after READY: nothing drains its pipe"
    finally:
        child.stop()


class FakeServer(ServerProcess):
    """`ServerProcess` with a child module of this file in place of the buffer server."""

    def __init__(self, directory, module: str, *args: str, ready_timeout_s: float):
        super().__init__(directory, ready_timeout_s=ready_timeout_s)
        self.module, self.module_args = module, list(args)

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.module_args]


def test_the_buffer_test_server_waits_with_the_same_deadline(modules):
    server = FakeServer(modules, "partial", ready_timeout_s=2)
    try:
        result, took = _bounded(server.start, lambda: server.proc, limit_s=8)
        assert took < 6, "ServerProcess.start blocked on a partial line past its deadline"
        assert isinstance(result, RuntimeError) and "did not start" in str(result)
    finally:
        server.__exit__(None, None, None)


def test_the_buffer_test_server_finds_a_ready_line_after_a_banner(modules):
    line = "banner|clawjax buffer listening on 127.0.0.1:4567|"
    server = FakeServer(modules, "two_lines", line, ready_timeout_s=5)
    try:
        result, took = _bounded(server.start, lambda: None, limit_s=10)
        assert result == "127.0.0.1:4567" and took < 3, (result, took)
        assert server.port == 4567
    finally:
        server.__exit__(None, None, None)


def test_pipe_lines_refuses_a_buffered_stream(modules):
    """A buffered (or text) stream would hide lines from select(): refused, saying so."""
    from clawjax.pipe_lines import PipeLines
    proc = subprocess.Popen([sys.executable, "-c", "pass"], stdout=subprocess.PIPE, text=True)
    try:
        with pytest.raises(TypeError, match="unbuffered binary pipe"):
            PipeLines(proc.stdout)
    finally:
        proc.wait()
        proc.stdout.close()
