"""The env runner against a scripted OpenAI-compatible chat server on 127.0.0.1: concurrent
episodes keep per-session transcripts, session fields and rewards straight; errors stay local."""

import json
import re
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clawjax.rollout import runner, tasks
from clawjax.rollout.envs import HomeworkEnv, TerminalEnv, ToolCallEnv, homework


class ScriptedChat:
    """A chat-completions server answering each session from a fixed list of replies.

    `script[session_id]` is the list of replies to that session's main-line calls in order
    (None → HTTP 500). A call with session_done gets the proxy's close-only answer
    (`{"object": "session.done"}`) when it asks for max_tokens 0, else an empty reply. Every
    request is recorded
    with its headers; `first_barrier` (optional) holds each session's first call until that many
    sessions are waiting at once, which only a concurrent client can satisfy."""

    def __init__(self, script, first_barrier=None, raw=None, solver=None):
        self.script = script
        self.solver = solver
        self.raw = raw or {}
        self.barrier = threading.Barrier(first_barrier, timeout=20) if first_barrier else None
        self.requests = []
        self.calls = defaultdict(int)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        chat = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with chat.lock:
                    chat.in_flight += 1
                    chat.max_in_flight = max(chat.max_in_flight, chat.in_flight)
                try:
                    status, payload = chat.answer(self.path, dict(self.headers), body)
                finally:
                    with chat.lock:
                        chat.in_flight -= 1
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def answer(self, path, headers, body):
        session = headers.get("X-Session-Id")
        with self.lock:
            self.requests.append({"path": path, "headers": headers, "body": body})
            index = self.calls[session]
            if not body.get("session_done"):
                self.calls[session] += 1
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {path}"}}
        if body.get("session_done"):
            if body.get("max_tokens") == 0:
                return 200, {"object": "session.done", "session_id": body.get("session_id")}
            return 200, completion("")
        if session in self.raw:
            return 200, self.raw[session]
        if self.barrier is not None and index == 0:
            try:
                self.barrier.wait()
            except threading.BrokenBarrierError:
                return 503, {"error": {"message": "sessions did not arrive concurrently"}}
        reply = self.solver(body) if self.solver else self.script[session][index]
        if reply is None:
            return 500, {"error": {"message": "scripted failure", "type": "server_error"}}
        return 200, completion(reply)

    def of(self, session):
        return [r for r in self.requests if r["headers"].get("X-Session-Id") == session]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def completion(text):
    return {"id": "cmpl-1", "object": "chat.completion", "model": "scripted",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}]}


@pytest.fixture
def servers():
    made = []
    yield lambda *a, **k: made.append(ScriptedChat(*a, **k)) or made[-1]
    for s in made:
        s.close()


def test_step_reward_totals_against_a_reference():
    process = [1.0, -1.0, 0.0, 1, -1]
    assert runner.step_reward_totals(process, 1.0) == [2.0, 0.0, 1.0, 2.0, 0.0]
    assert runner.step_reward_totals(process, 0) == [1.0, -1.0, 0.0, 1.0, -1.0]
    assert runner.step_reward_totals([], 1.0) == []
    assert runner.step_reward_totals([0.5], -0.25) == [0.25]
    with pytest.raises(ValueError, match=r"step_rewards\[1\] = nan"):
        runner.step_reward_totals([1.0, float("nan")], 0.0)
    with pytest.raises(ValueError, match=r"step_rewards\[0\] = '1'"):
        runner.step_reward_totals(["1"], 0.0)
    with pytest.raises(ValueError, match="outcome_reward = inf"):
        runner.step_reward_totals([1.0], float("inf"))
    with pytest.raises(ValueError, match="outcome_reward = True"):
        runner.step_reward_totals([1.0], True)


def homework_case(i):
    """Session i's task, scripted replies and expected (outcome, turns)."""
    seed = 40 + i
    answer = homework.make_problem(seed).answer
    variant = i % 3
    if variant == 0:
        return {"task_id": f"hw-{i}", "seed": seed}, [f"It is {answer}."], (1.0, 1)
    if variant == 1:
        return ({"task_id": f"hw-{i}", "seed": seed, "preference": "final_only"},
                [f"The answer is {answer}.", str(answer)], (1.0, 2))
    return ({"task_id": f"hw-{i}", "seed": seed, "max_attempts": 2},
            [f"{answer + 1}", "I am not sure."], (0.0, 2))


def expected_transcript(task, replies):
    """The conversation an episode should have, built by stepping a separate environment."""
    env = HomeworkEnv()
    messages = [env.reset(task).as_message()]
    for reply in replies:
        obs, done, _ = env.step(reply)
        messages += [{"role": "assistant", "content": reply}, obs.as_message()]
        if done:
            break
    return messages


def test_concurrent_sessions_keep_transcripts_fields_and_rewards_apart(servers):
    n = 15
    cases = [homework_case(i) for i in range(n)]
    chat = servers({f"run-{i}": replies for i, (_, replies, _) in enumerate(cases)})
    results = runner.run_episodes(
        chat.url, [(HomeworkEnv(), task) for task, _, _ in cases], concurrency=4, model="policy",
        api_key="k3y", session_prefix="run", sampling={"temperature": 1.0, "max_tokens": 64})
    assert chat.max_in_flight <= 4
    assert [r.session_id for r in results] == [f"run-{i}" for i in range(n)]
    for i, (result, (task, replies, (outcome, turns))) in enumerate(zip(results, cases)):
        sid = f"run-{i}"
        assert result.error is None, result.error
        assert (result.task_id, result.env, result.done) == (task["task_id"], "homework", True)
        assert (result.outcome_reward, result.turns) == (outcome, turns)
        transcript = expected_transcript(task, replies)
        assert result.messages == transcript
        assert [s.action for s in result.steps] == replies[:turns]
        assert [s.outcome_reward for s in result.steps][-1] == outcome
        # What the server saw for this session: each main call carries the transcript so far.
        seen = chat.of(sid)
        assert len(seen) == turns + 1
        for k, request in enumerate(seen):
            body, headers = request["body"], request["headers"]
            assert body["session_id"] == headers["X-Session-Id"] == sid
            assert body["turn_type"] == headers["X-Turn-Type"] == "main"
            assert body["model"] == "policy" and body["stream"] is False
            assert headers["Authorization"] == "Bearer k3y"
            assert "episode" not in body and "X-Episode" not in headers  # a simulated user
            if k < turns:
                assert body["temperature"] == 1.0
                assert body["messages"] == transcript[:2 * k + 1]
                assert "session_done" not in body and "X-Session-Done" not in headers
                assert body["max_tokens"] == 64
        close = seen[-1]
        assert close["body"]["session_done"] is True and close["headers"]["X-Session-Done"] == "true"
        assert close["body"]["messages"] == transcript  # ends with the last turn's next state
        assert close["body"]["outcome_reward"] == outcome
        assert float(close["headers"]["X-Outcome-Reward"]) == outcome
        # Close-only: nothing generated, so no new turn (and no sampling field that could
        # override max_tokens 0, e.g. max_completion_tokens).
        assert close["body"]["max_tokens"] == 0 and "temperature" not in close["body"]
    assert runner.summarize(results) == {"episodes": 15.0, "done": 15.0, "errors": 0.0,
                                         "mean_outcome": 10 / 15, "mean_turns": 25 / 15}


def test_episodes_really_run_concurrently(servers):
    n = 6
    cases = [homework_case(3 * i) for i in range(n)]  # one-turn successes
    chat = servers({f"c-{i}": replies for i, (_, replies, _) in enumerate(cases)}, first_barrier=n)
    results = runner.run_episodes(chat.url, [(HomeworkEnv(), t) for t, _, _ in cases],
                                  concurrency=n, session_prefix="c")
    assert [r.error for r in results] == [None] * n
    assert [r.outcome_reward for r in results] == [1.0] * n


def test_rounds_can_share_one_environment_pool_and_tls_context(servers):
    """A caller running round after round (the default run's agents) passes one long-lived
    pool: every environment call runs on its threads, and the pool outlives the round. Every
    round's client verifies TLS with the one context built per process."""
    from concurrent.futures import ThreadPoolExecutor

    class RecordingEnv(HomeworkEnv):
        def reset(self, task):
            threads.append(threading.current_thread().name)
            return super().reset(task)

    threads: list[str] = []
    assert runner.tls_context() is runner.tls_context()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="shared-env") as pool:
        for round_index in range(2):
            cases = [homework_case(3 * i + round_index) for i in range(3)]
            chat = servers({f"r{round_index}-{i}": replies for i, (_, replies, _) in enumerate(cases)})
            results = runner.run_episodes(chat.url, [(RecordingEnv(), t) for t, _, _ in cases],
                                          concurrency=2, session_prefix=f"r{round_index}",
                                          executor=pool)
            assert [r.outcome_reward for r in results] == [1.0] * 3
        assert pool.submit(lambda: 7).result() == 7  # not shut down by the rounds
    assert len(threads) == 6 and all(t.startswith("shared-env") for t in threads), threads


def test_tool_and_terminal_environments_send_tool_messages(servers, tmp_path):
    tool_task = {"env": "toolcall", "task_id": "tc", "question": "How many hours are in 2 days?",
                 "answer": 48}
    term_task = {"env": "terminal", "task_id": "tm", "instruction": "Write hi into a.txt.",
                 "check": {"path": "a.txt", "content": "hi"}}
    script = {"m-0": ["CALL lookup: hours in a day", "CALL calculator: 24 * 2", "ANSWER: 48"],
              "m-1": ["$ echo hi > a.txt", "$ cat a.txt", "DONE"],
              "u-0": ["CALL calculator: 1 +", "ANSWER: 47"]}
    chat = servers(script)
    term = TerminalEnv(root=str(tmp_path))
    results = runner.run_episodes(chat.url, [(ToolCallEnv(), tool_task), (term, term_task)],
                                  concurrency=2, session_prefix="m", system_prompt="Be brief.")
    tool, terminal = results
    assert [m["role"] for m in tool.messages] == ["system", "user", "assistant", "tool", "assistant",
                                                  "tool", "assistant", "user"]
    assert [m["content"] for m in tool.messages if m["role"] == "tool"] == ["OK 24", "OK 48"]
    assert (tool.outcome_reward, tool.done) == (1.0, True)
    assert [m["content"] for m in terminal.messages if m["role"] == "tool"] == ["OK", "OK\nhi\n"]
    assert (terminal.outcome_reward, terminal.done) == (1.0, True)
    assert term.workdir is None and list(tmp_path.iterdir()) == []  # the runner closed the env
    assert chat.of("m-0")[0]["body"]["messages"][0] == {"role": "system", "content": "Be brief."}
    for session in ("m-0", "m-1"):  # general agents: every call says episode (SPEC §2)
        calls = chat.of(session)
        assert all(c["body"]["episode"] is True and c["headers"]["X-Episode"] == "true"
                   for c in calls)
        assert calls[-1]["body"]["outcome_reward"] == 1.0 and calls[-1]["body"]["session_done"]

    as_user = runner.run_episodes(chat.url, [(ToolCallEnv(), tool_task)], session_prefix="u",
                                  tool_role="user")[0]
    assert [m["role"] for m in as_user.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert as_user.messages[2]["content"].startswith("ERROR calculator")
    assert (as_user.outcome_reward, as_user.done) == (0.0, True)


class BrokenEnv(HomeworkEnv):
    """Steps fail after the first; closing fails too."""

    def step(self, action):
        if self._state.steps >= 1:
            raise RuntimeError("simulator crashed")
        return super().step(action)

    def close(self):
        raise OSError("cannot clean up")


def test_errors_end_only_their_own_episode(servers):
    ok_task, ok_replies, _ = homework_case(0)
    chat = servers({"e-0": ok_replies, "e-1": [None], "e-3": ["7"] * 10, "e-5": ["1", "2"]},
                   raw={"e-4": {"choices": []}})
    episodes = [(HomeworkEnv(), ok_task),
                (HomeworkEnv(), {"task_id": "x", "seed": 1}),
                (HomeworkEnv(), {"task_id": "bad", "seed": "one"}),  # the env rejects the task
                (HomeworkEnv(), {"task_id": "long", "question": "What is 1 + 1?", "answer": 2,
                                 "max_attempts": 10}),
                (HomeworkEnv(), {"task_id": "y", "seed": 2}),
                (BrokenEnv(), {"task_id": "z", "question": "What is 1 + 1?", "answer": 2})]
    results = runner.run_episodes(chat.url, episodes, concurrency=3, session_prefix="e", max_turns=3)
    ok, failed, bad, long, malformed, broken = results
    assert ok.error is None and ok.outcome_reward == 1.0
    assert "HTTP 500" in failed.error and "scripted failure" in failed.error and failed.turns == 0
    assert "task['seed'] = 'one'" in bad.error and chat.of("e-2") == []
    assert long.error is None and (long.done, long.turns, long.outcome_reward) == (False, 3, 0.0)
    assert chat.of("e-3")[-1]["body"]["session_done"] is True  # closed although not done
    assert "not a chat completion" in malformed.error
    assert broken.error == ("environment homework: RuntimeError: simulator crashed; "
                            "environment homework: close failed: OSError: cannot clean up")
    assert broken.turns == 1 and [m["role"] for m in broken.messages][-1] == "assistant"
    assert runner.summarize(results)["errors"] == 4.0


def test_bad_arguments_and_urls(servers):
    env = HomeworkEnv()
    with pytest.raises(ValueError, match="concurrency = 0"):
        runner.run_episodes("http://127.0.0.1:1", [(env, {})], concurrency=0)
    with pytest.raises(ValueError, match="max_turns = 0"):
        runner.run_episodes("http://127.0.0.1:1", [(env, {})], max_turns=0)
    with pytest.raises(ValueError, match="appears twice"):
        runner.run_episodes("http://127.0.0.1:1", [(env, {}), (env, {})])
    with pytest.raises(ValueError, match="tool_role = 'system'"):
        runner.run_episodes("http://127.0.0.1:1", [(env, {})], tool_role="system")
    assert runner.chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert runner.chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert runner.chat_completions_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"
    # Nothing listening: the episode records the connection error.
    task, _, _ = homework_case(0)
    result = runner.run_episodes("http://127.0.0.1:9", [(HomeworkEnv(), task)], timeout_s=5)[0]
    assert result.error.startswith("POST http://127.0.0.1:9/v1/chat/completions failed")


def test_command_line_runs_a_shard_and_resumes_the_task_stream(servers, tmp_path, capsys):
    def solver(body):  # answers "What is a + b?" from the first user message
        a, b = re.search(r"What is (\d+) \+ (\d+)\?", body["messages"][0]["content"]).groups()
        return f"{a} + {b} = {int(a) + int(b)}"

    chat = servers({}, solver=solver)
    path = str(tmp_path / "tasks.jsonl")
    tasks.write_jsonl_tasks(path, [{"env": "homework", "task_id": f"q-{i}",
                                    "question": f"What is {i} + {3 * i}?", "answer": 4 * i}
                                   for i in range(10)])
    out, state = str(tmp_path / "results.jsonl"), str(tmp_path / "tasks.state")
    argv = ["--url", chat.url, "--tasks", path, "--episodes", "4", "--concurrency", "2",
            "--seed", "9", "--out", out, "--state", state, "--max-tokens", "16"]
    assert runner.main(argv + ["--session-prefix", "a"]) == 0
    assert "episodes=4 done=4 errors=0 mean_outcome=1" in capsys.readouterr().out
    assert runner.main(argv + ["--session-prefix", "b"]) == 0
    lines = [json.loads(line) for line in open(out)]
    expected = [t["task_id"] for t in tasks.TaskStream(tasks.JsonlTaskSource(path), seed=9).take(8)]
    assert [line["task_id"] for line in lines] == expected
    assert [line["session_id"] for line in lines] == [f"a-{i}" for i in range(4)] + [f"b-{i}" for i in range(4)]
    assert all(line["outcome_reward"] == 1.0 and line["done"] and line["error"] is None for line in lines)
    assert lines[0]["steps"][0]["observation"] == {"role": "user", "text": homework.THANKS}
    assert lines[0]["messages"][-1] == {"role": "user", "content": homework.THANKS}
    assert all(r["body"]["max_tokens"] == 16 for r in chat.requests if not r["body"].get("session_done"))


@pytest.mark.parametrize("flag,bad", [("--concurrency", "0"), ("--episodes", "-1"),
                                      ("--max-turns", "0"), ("--temperature", "nan"),
                                      ("--temperature", "-1"), ("--max-tokens", "0"),
                                      ("--shard-count", "0"), ("--shard-index", "2"),
                                      ("--time-limit-s", "inf")])
def test_command_line_refuses_flags_no_episode_could_run_with(tmp_path, capsys, flag, bad):
    """Each was a traceback (or requests that all fail) after reading the tasks: now exit 2 at
    once, naming the flag, the value and what is expected; nothing is written."""
    path = str(tmp_path / "tasks.jsonl")
    tasks.write_jsonl_tasks(path, [{"env": "homework", "task_id": "q", "question": "What is 1 + 1?",
                                    "answer": 2}])
    out = tmp_path / "results.jsonl"
    with pytest.raises(SystemExit) as stopped:
        runner.main(["--url", "http://127.0.0.1:9", "--tasks", path, "--episodes", "1",
                     "--out", str(out), flag, bad])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} = " in err and "expected" in err, err
    assert not out.exists()


def test_command_line_refuses_a_task_naming_no_known_environment(tmp_path, capsys):
    path = str(tmp_path / "tasks.jsonl")
    tasks.write_jsonl_tasks(path, [{"env": "spreadsheet", "task_id": "q"}])
    out = tmp_path / "results.jsonl"
    with pytest.raises(SystemExit) as stopped:
        runner.main(["--url", "http://127.0.0.1:9", "--tasks", path, "--episodes", "1",
                     "--out", str(out)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "task 'q'" in err and "'spreadsheet'" in err and "expected" in err, err
    assert not out.exists()
