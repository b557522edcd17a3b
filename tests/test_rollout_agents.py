"""`python -m clawjax.rollout.agents`: the default run's simulated users as their own process.
Run against a real chat server on loopback (the rule judge, which answers any chat request) and
a real buffer server: rounds are run and counted, SIGTERM stops the process cleanly, a restart
continues the counts, `--max-queued` holds rounds back while the buffer is full, and bad input is
refused with the argument named. Also `LocalStack.start_child` / `stop_child`, which the default
run starts and stops the agents with."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from clawjax import default_task
from clawjax.buffer import BufferClient, BufferServer
from clawjax.local_stack import Child, LocalStack, free_port
from clawjax.rollout import agents
from clawjax.sample import Sample

TASKS = default_task.split_tasks(0.2, 0)[0][:6]


@pytest.fixture
def chat_url(tmp_path):
    judge = Child("judge", ["clawjax.rollout.rule_judge", "--port", str(free_port())],
                  r"READY (http://\S+)", str(tmp_path / "judge.log"))
    try:
        yield judge.start(timeout_s=60)
    finally:
        judge.stop()


def agents_child(tmp_path, url: str, *extra: str) -> tuple[Child, str]:
    tasks, stats = tmp_path / "tasks.jsonl", tmp_path / "stats.json"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    child = Child("agents", ["clawjax.rollout.agents", "--proxy-url", url, "--tasks", str(tasks),
                             "--stats", str(stats), "--concurrency", "2", "--seed", "3", *extra],
                  r"READY (agents)", str(tmp_path / "agents.log"))
    return child, str(stats)


def queued_sample(i: int) -> Sample:
    return Sample(f"s{i}", np.arange(8), 4, rollout_logp=np.full(4, -0.5))


def wait_until(predicate, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not reached in {timeout_s}s")


def test_rounds_are_counted_stopped_cleanly_and_continued_after_a_restart(tmp_path, chat_url):
    child, stats_path = agents_child(tmp_path, chat_url)
    assert child.start(timeout_s=60) == "agents"
    try:
        stats = wait_until(lambda: (s := agents.AgentStats.read(stats_path)).rounds >= 2 and s)
        # A round is 2 x concurrency episodes (of the 6 tasks), every one of which completes.
        assert stats.episodes == 4 * stats.rounds and stats.errors == 0
        assert stats.waited_s == 0.0  # no --max-queued: never waits
    finally:
        child.proc.send_signal(signal.SIGTERM)
        assert child.proc.wait(timeout=30) == 0  # stops after the round in flight
    stopped = agents.AgentStats.read(stats_path)
    assert stopped.rounds >= stats.rounds and stopped.episodes == 4 * stopped.rounds

    # A restart goes on counting from the file (its session ids are fresh: run_rounds).
    # Counts far above what a fresh start could reach within the wait tell the two apart.
    agents.AgentStats(episodes=4 * 10**6, rounds=10**6, waited_s=2.5).write(stats_path)
    child.start(timeout_s=60)
    try:
        again = wait_until(lambda: (s := agents.AgentStats.read(stats_path)).rounds > 10**6
                           and s)
        assert again.episodes == 4 * again.rounds and again.waited_s == 2.5
    finally:
        child.stop()
    assert "Traceback" not in (tmp_path / "agents.log").read_text()


def test_max_queued_holds_rounds_back_while_the_buffer_is_full(tmp_path, chat_url):
    server = BufferServer(tmp_path / "buffer", fsync=False)
    address = f"127.0.0.1:{server.start()}"
    try:
        with BufferClient(address) as buffer:
            buffer.push([queued_sample(i) for i in range(3)])
            child, stats_path = agents_child(tmp_path, chat_url, "--buffer", address,
                                             "--max-queued", "3")
            child.start(timeout_s=60)
            try:
                time.sleep(1.5)
                held = agents.AgentStats.read(stats_path)
                assert held.rounds == 0 and held.episodes == 0  # 3 queued >= 3: it waits
                leased = buffer.lease(1, timeout_s=5)
                buffer.ack([s.sample_id for s in leased])  # the trainer takes one: room
                resumed = wait_until(
                    lambda: (s := agents.AgentStats.read(stats_path)).rounds >= 1 and s)
                assert resumed.waited_s >= 1.0 and resumed.episodes >= 4
            finally:
                child.stop()
    finally:
        server.stop()


def test_bad_arguments_and_task_files_are_refused_with_the_field_named(tmp_path, capsys):
    for argv, reason in ((["--concurrency", "0"], "--concurrency 0: expected >= 1"),
                         (["--max-queued", "4"], "--max-queued 4: expected >= 1, with --buffer")):
        with pytest.raises(SystemExit) as exit_info:
            agents.parse_args(["--proxy-url", "http://127.0.0.1:1", "--tasks", "t.jsonl",
                               "--stats", "s.json", *argv])
        assert exit_info.value.code == 2 and reason in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"--tasks .*empty.jsonl: no tasks"):
        agents.read_tasks(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TASKS[0]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: '\[1, 2\]', expected a JSON object"):
        agents.read_tasks(str(bad))
    assert agents.AgentStats.read(str(tmp_path / "missing.json")) == agents.AgentStats()


PROBE = "import time\nprint('READY probe', flush=True)\ntime.sleep(120)\n"


def test_a_started_child_is_supervised_until_stop_child(tmp_path, monkeypatch):
    """`start_child` adds a child the supervisor restarts when it dies; after `stop_child` it is
    neither restarted nor listed in `pids.json`."""
    with monkeypatch.context() as patch:  # the four stack processes are not under test here
        patch.setattr(LocalStack, "_child", lambda self, name, args, ready, env=None: "x:1")
        stack = LocalStack(str(tmp_path), "model").start()
    (tmp_path / "probe_child.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        assert stack.start_child("probe", ["probe_child"], r"READY (probe)") == "probe"
        with pytest.raises(ValueError, match="child name 'probe': already running"):
            stack.start_child("probe", ["probe_child"], r"READY (probe)")
        pids = lambda: json.loads((tmp_path / "pids.json").read_text())
        first = pids()["probe"]
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: pids().get("probe") not in (None, first))
        assert stack.restarts() == {"probe": 1}
        second = pids()["probe"]
        stack.stop_child("probe")
        assert "probe" not in pids() and stack.restarts() == {}
        time.sleep(1.5)  # three supervisor rounds: nothing comes back
        assert "probe" not in pids()
        with pytest.raises(ProcessLookupError):
            os.kill(second, 0)
    finally:
        stack.stop()


def test_a_task_line_that_is_not_json_is_refused_naming_the_file_and_line(tmp_path):
    """`read_tasks` promises a ValueError naming the file for a line that is not a JSON object;
    a line that is not JSON at all is such a line."""
    bad = tmp_path / "broken.jsonl"
    bad.write_text(json.dumps(TASKS[0]) + "\n{\"env\": \"homework\",\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:2: .*expected a JSON object"):
        agents.read_tasks(str(bad))
