"""Edge cases of the rollout side: a session id reused while a request of its closed session
is still generating, agent rounds that fail as a whole, request fields of the wrong JSON type,
and malformed policy server answers. Proxy tests run against a scripted `/generate` on loopback
(real HTTP) with the rule judge and a real gRPC buffer; only a tokenizer is needed."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from clawjax.buffer import BufferClient
from clawjax.rollout import agents
from clawjax.rollout.sessions import Dropped, JudgeJob, LoneTurn, SessionTable, Turn
from scripted_upstream import GOOD, proxy_stack, script_for_one_test


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from proxy_stack(tmp_path_factory, "edges")


@pytest.fixture
def script(stack):
    """The policy's script, reset to a good plain answer after each test."""
    yield from script_for_one_test(stack)


def post(stack, body: dict) -> httpx.Response:
    return httpx.post(stack["proxy"].url + "/v1/chat/completions", json=body, timeout=60)


def settled(stack) -> dict:
    snapshot = httpx.get(stack["proxy"].url + "/stats", params={"idle_timeout": 30},
                         timeout=60).json()
    assert snapshot["idle"] is True, snapshot
    return snapshot


def leased(stack, session: str) -> list:
    with BufferClient(stack["address"]) as client:
        return [s for s in client.lease(1000, timeout_s=1.0) if s.session_id == session]


def msgs(*roles_texts):
    return [{"role": r, "content": t} for r, t in roles_texts]


def turn(sid: str, index: int) -> Turn:
    return Turn(session_id=sid, turn_index=index, messages=msgs(("user", "q")),
                prompt_ids=[1, 2, 3], response_ids=[10, 11], rollout_logp=[-0.5, -0.5],
                weight_version="1", response_text="a")


# --- 1. a closed session's id reused while one of its requests still generates ----------------

def test_a_late_turn_of_a_closed_session_is_not_taken_by_a_new_session_of_its_id():
    """Request A of "s" is generating when another request's session_done closes "s"; a new
    request B reuses the id (a new session). A's late turn belongs to the CLOSED session (its
    only main turn: a LoneTurn), not to the new one; A's end does not make B's session look
    idle; B's turn is the new session's own (its only one at the close)."""
    table = SessionTable(idle_expiry_s=10)
    a, _ = table.begin("s", "main", msgs(("user", "q")), 0)
    assert table.close("s") == [] and table.tombstones == 1
    b, _ = table.begin("s", "main", msgs(("user", "q again")), 1)
    assert b != a                          # indices never repeat while A may still finish
    late = turn("s", a)
    assert table.finish(late, 2) == [LoneTurn(late)]
    table.end("s", a, 2)
    assert table.tombstones == 0 and "s" in table
    assert table.expire(now=100) == [] and "s" in table   # B is still in flight
    tb = turn("s", b)
    assert table.finish(tb, 101) == []                     # B is the new session's pending turn
    table.end("s", b, 101)
    assert table.close("s") == [LoneTurn(tb)]


def test_a_late_turn_of_a_closed_multi_turn_session_is_dropped_under_a_reused_id():
    table = SessionTable(idle_expiry_s=10)
    a, _ = table.begin("s", "main", msgs(("user", "q")), 0)
    ta = turn("s", a)
    table.finish(ta, 0)
    table.end("s", a, 0)
    c, ev = table.begin("s", "main", msgs(("user", "q"), ("assistant", "a"), ("user", "no")), 1)
    assert [type(e) for e in ev] == [JudgeJob]
    assert table.close("s") == []
    b, _ = table.begin("s", "main", msgs(("user", "new")), 2)
    tb = turn("s", b)
    assert table.finish(tb, 2) == []
    late = turn("s", c)                                # the closed session's second turn
    assert table.finish(late, 3) == [Dropped(late, "no_next_state")]
    table.end("s", c, 3)
    table.end("s", b, 3)
    # The new session's pending turn was not displaced by the late one.
    _, ev = table.begin("s", "main", msgs(("user", "new"), ("assistant", "a"), ("user", "ok")), 4)
    assert ev == [JudgeJob(tb, ev[0].next_state, False)]


def test_the_proxy_keeps_a_late_turn_with_its_closed_session_when_the_id_is_reused(stack, script):
    """End to end: A of session "reused" is generating (held by the policy) while a close-only
    call closes the session and B opens a new one under the same id. Each session had one main
    turn: both are emitted (at-least-one guarantee), with distinct turn indices."""
    session = "reused"
    script["holds"] = 1
    calls = script["calls"]
    result: dict = {}
    slow = threading.Thread(target=lambda: result.update(a=post(stack, {
        "messages": msgs(("user", "first")), "session_id": session})))
    slow.start()
    deadline = time.monotonic() + 30
    while script["calls"] == calls and time.monotonic() < deadline:
        time.sleep(0.02)
    assert post(stack, {"session_id": session, "session_done": True}).status_code == 200
    b = post(stack, {"messages": msgs(("user", "second")), "session_id": session})
    assert b.status_code == 200, b.text
    script["release"].set()                            # A's generation ends only now
    slow.join(60)
    assert result["a"].status_code == 200, result["a"].text
    indices = {result["a"].json()["metadata"]["turn_index"], b.json()["metadata"]["turn_index"]}
    assert len(indices) == 2, indices
    assert post(stack, {"session_id": session, "session_done": True}).status_code == 200
    settled(stack)
    got = leased(stack, session)
    assert sorted(s.turn_index for s in got) == sorted(indices), \
        [(s.turn_index, s.metadata) for s in got]


# --- 2. agent rounds: every round's session ids are fresh --------------------------------------

def test_a_round_after_a_failed_round_gets_fresh_session_ids(monkeypatch):
    """A round that fails as a whole may have left sessions open in the proxy (episodes cut off
    mid-way); the next round must not send its episodes under those ids."""
    prefixes: list[str] = []
    stop = threading.Event()

    async def fake_run(url, pairs, *, session_prefix, **kwargs):
        prefixes.append(session_prefix)
        if len(prefixes) == 1:
            raise httpx.ConnectError("proxy down")
        if len(prefixes) >= 3:
            stop.set()
        return []

    monkeypatch.setattr(agents, "run_episodes_async", fake_run)
    tasks = [{"env": "homework", "task_id": "t0", "question": "1 + 1?", "answer": "2"}]
    stats = agents.AgentStats()
    agents.run_rounds("http://127.0.0.1:1", tasks, stop, stats, concurrency=1, seed=0,
                      sampling={})
    assert len(prefixes) == 3 and len(set(prefixes)) == 3, prefixes
    assert stats.errors == 1 and stats.rounds == 2


def test_a_restarted_agents_process_never_reuses_a_round_prefix(monkeypatch):
    """The stats file counts finished rounds only: a process killed during a round restarts
    with the same count, and that round's sessions may still be open in the proxy."""
    prefixes: list[str] = []

    def run_once(stats):
        stop = threading.Event()

        async def fake_run(url, pairs, *, session_prefix, **kwargs):
            prefixes.append(session_prefix)
            stop.set()
            return []

        monkeypatch.setattr(agents, "run_episodes_async", fake_run)
        agents.run_rounds("http://127.0.0.1:1", [{"env": "homework"}], stop, stats,
                          concurrency=1, seed=0, sampling={})

    run_once(agents.AgentStats(rounds=7))      # killed before the round's stats were written
    run_once(agents.AgentStats(rounds=7))      # the restart
    assert len(set(prefixes)) == 2, prefixes


# --- 3. request fields of the wrong JSON type ---------------------------------------------------

@pytest.mark.parametrize("extra, field, value, expected", [
    ({"n": True}, "n", "True", "the integer 1"),
    ({"n": 1.0}, "n", "1.0", "the integer 1"),
    ({"n": 2}, "n", "2", "the integer 1"),
    ({"stream_options": {"include_usage": "no"}}, "stream_options.include_usage", "'no'",
     "true or false"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage", "1",
     "true or false"),
    ({"stream_options": False}, "stream_options", "False", "an object"),
    ({"stream_options": []}, "stream_options", "[]", "an object"),
    ({"top_logprobs": False}, "top_logprobs", "False", "an integer in [0, 20]"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty", "nan", "a finite number"),
    ({"presence_penalty": float("inf")}, "presence_penalty", "inf", "a finite number"),
    ({"top_logprobs": 3}, "top_logprobs", "3", "0 or null unless 'logprobs' is true"),
    ({"top_logprobs": 3, "logprobs": False}, "top_logprobs", "3",
     "0 or null unless 'logprobs' is true"),
    ({"session_id": "user-\ud83d"}, "session_id", "'user-\\ud83d'", "in UTF-8"),
], ids=["n-true", "n-float", "n-2", "include_usage-str", "include_usage-int",
        "stream_options-false", "stream_options-list", "top_logprobs-false", "penalty-nan",
        "penalty-inf", "top_logprobs-no-logprobs", "top_logprobs-logprobs-false",
        "session_id-lone-surrogate"])
def test_a_field_of_the_wrong_json_type_is_refused_naming_it(stack, extra, field, value,
                                                             expected):
    """`n: true` and `n: 1.0` equal 1 in Python, `include_usage: "no"` is truthy: each is a
    value of the wrong JSON type, refused like any other bad value. A non-finite penalty (JSON
    NaN / Infinity, which Python's parser accepts) would reach the sampler. Also refused: a
    `top_logprobs` without `logprobs: true` (as OpenAI and the embedded server do), and a
    session id with no UTF-8 encoding (JSON "\\ud83d"), whose samples could never be pushed."""
    body = json.dumps({"messages": msgs(("user", "hi")), **extra})    # NaN/Infinity literals
    r = httpx.post(stack["proxy"].url + "/v1/chat/completions", content=body, timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field, error
    assert value in error["message"] and expected in error["message"], error


def test_null_or_absent_optional_fields_are_accepted(stack, script):
    for extra in ({"n": None}, {"n": 1}, {"stream_options": None},
                  {"stream_options": {"include_usage": None}}, {"top_logprobs": None},
                  {"top_logprobs": 0}, {"top_logprobs": 2, "logprobs": True}):
        r = post(stack, {"messages": msgs(("user", "hi")), **extra})
        assert r.status_code == 200, (extra, r.text)


def test_a_session_id_header_that_is_not_utf8_is_refused_naming_it(stack):
    """A sample's ids must encode as UTF-8 on the buffer's wire: an `X-Session-Id` of other
    bytes (read with surrogate escapes) is refused at the door, not accepted and then stuck."""
    r = httpx.post(stack["proxy"].url + "/v1/chat/completions", timeout=60,
                   json={"messages": msgs(("user", "hi"))},
                   headers={"X-Session-Id": b"user-\xff"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "X-Session-Id" and "in UTF-8" in error["message"], error


@pytest.mark.parametrize("raw", [b"[" * 100_000,
                                 b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}"],
                         ids=["nested-100000-deep", "5000-digit-integer"])
def test_a_body_python_cannot_parse_is_refused_as_bad_json_naming_it(stack, raw):
    """Nesting past the parser's recursion (RecursionError) and an integer past Python's
    4300-digit conversion limit (a bare ValueError) are bad JSON like any other: 400."""
    r = httpx.post(stack["proxy"].url + "/v1/chat/completions", content=raw, timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "body" and "valid JSON" in error["message"], error


# --- 4. malformed policy server answers -------------------------------------------------------

def _answer(**meta) -> dict:
    return {**GOOD, "meta_info": {**GOOD["meta_info"], **meta}}


@pytest.mark.parametrize("answer, field", [
    (_answer(output_token_logprobs=[[-0.1, None, None]]), "meta_info.output_token_logprobs[0]"),
    (_answer(output_token_logprobs=[[-0.1, "5", None]]), "meta_info.output_token_logprobs[0]"),
    (_answer(output_token_logprobs=[None]), "meta_info.output_token_logprobs[0]"),
    (_answer(output_token_logprobs=7), "meta_info.output_token_logprobs"),
    (_answer(output_token_logprobs=[[-0.1, 2 ** 40, None]]),
     "meta_info.output_token_logprobs[0]"),
    ({**GOOD, "output_ids": [None]}, "output_ids[0]"),
    ({**GOOD, "output_ids": "5"}, "output_ids"),
    ({**GOOD, "meta_info": []}, "meta_info"),
    (_answer(completion_tokens="one"), "meta_info.completion_tokens"),
    (_answer(prompt_tokens=None, completion_tokens=[1]), "meta_info.completion_tokens"),
    ({**GOOD, "text": 5}, "text"),
    ([GOOD], "body"),
], ids=["token-id-none", "token-id-str", "token-id-huge", "entry-none", "entries-int",
        "output-id-none", "output-ids-str", "meta-list", "completion-tokens-str", "completion-tokens-list",
        "text-int", "not-an-object"])
@pytest.mark.parametrize("logprobs", [False, True], ids=["plain", "with-logprobs"])
def test_a_malformed_policy_answer_is_a_502_naming_the_field(stack, script, answer, field,
                                                             logprobs):
    script["answer"] = answer
    r = post(stack, {"messages": msgs(("user", "hi")), "session_id": f"bad-{field}",
                     "logprobs": logprobs})
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["param"] == field and "policy server" in error["message"], error
    script["answer"] = GOOD
    assert post(stack, {"messages": msgs(("user", "hi"))}).status_code == 200  # still serving
    assert post(stack, {"session_id": f"bad-{field}", "session_done": True}).status_code == 200
    assert settled(stack)["sessions_open"] == 0


def test_a_malformed_streamed_policy_answer_ends_the_stream_with_a_502(stack, script):
    event = _answer(output_token_logprobs=[[-0.1, None, None]])
    script["stream"] = [json.dumps(event)]
    r = post(stack, {"messages": msgs(("user", "hi")), "stream": True,
                     "session_id": "bad-stream-id"})
    if r.status_code == 200:
        errors = [json.loads(line[6:])["error"] for line in r.text.splitlines()
                  if line.startswith("data: {") and '"error"' in line]
        assert errors and errors[0]["code"] == 502, r.text
        assert errors[0]["param"] == "meta_info.output_token_logprobs[0]", errors
    else:
        assert r.status_code == 502, r.text
    assert post(stack, {"session_id": "bad-stream-id", "session_done": True}).status_code == 200
    assert settled(stack)["sessions_open"] == 0


def test_a_task_naming_no_known_environment_is_refused_when_the_file_is_read(tmp_path):
    """`run_rounds` builds each sampled task's environment outside the per-episode error
    handling: a task with an unknown (or no) "env" would kill the agents process whenever it is
    drawn, and the supervisor's restart would die again. The file is refused up front."""
    path = tmp_path / "tasks.jsonl"
    good = {"env": "homework", "task_id": "t0", "question": "1 + 1?", "answer": 2}
    for bad in ({"env": "nope", "task_id": "t1"}, {"task_id": "t1"}, {"env": 5}):
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=r"tasks.jsonl:2: .*'env'.*expected one of"):
            agents.read_tasks(str(path))
    path.write_text(json.dumps(good) + "\n")
    assert agents.read_tasks(str(path)) == [good]


def test_a_reused_id_is_told_apart_from_a_closed_session_whose_tombstone_was_evicted():
    """Without a tombstone the late turn is dropped, but it still never lands in the new
    session of its id, and its end never counts against the new session's requests."""
    table = SessionTable(idle_expiry_s=10, max_tombstones=0)
    a, _ = table.begin("s", "main", msgs(("user", "q")), 0)
    assert table.close("s") == [] and table.tombstones == 0
    b, _ = table.begin("s", "main", msgs(("user", "again")), 1)
    assert b != a
    late = turn("s", a)
    assert table.finish(late, 2) == [Dropped(late, "no_next_state")]
    table.end("s", a, 2)
    assert table.expire(now=100) == [] and "s" in table      # b still in flight
    tb = turn("s", b)
    assert table.finish(tb, 100) == []
    table.end("s", b, 100)
    assert table.close("s") == [LoneTurn(tb)]
    c, _ = table.begin("s", "main", msgs(("user", "fresh")), 101)
    assert c == 0                                   # nothing of "s" in flight: counts from 0


# --- an untrainable answer still supersedes the pending turn -----------------------------------

def test_an_untrainable_answer_to_a_retry_leaves_the_older_turn_unjudged():
    """Turn 0 is pending; the client retries its prompt and gets turn 1, whose log-probs are
    unusable (not trainable). The client goes on from turn 1's answer, so the next request's
    trailing message is turn 1's next state, not turn 0's: turn 0 must not be judged by it."""
    table = SessionTable(idle_expiry_s=10)
    prompt = msgs(("user", "q"))
    a, _ = table.begin("s", "main", prompt, 0)
    t0 = turn("s", a)
    table.finish(t0, 0)
    table.end("s", a, 0)
    b, ev = table.begin("s", "main", list(prompt), 1)          # a retry: no next state
    assert ev == []
    assert table.untrainable("s", b, 1) == [Dropped(t0, "no_next_state")]
    table.end("s", b, 1)
    _, ev = table.begin("s", "main", prompt + msgs(("assistant", "b"), ("user", "Thanks!")), 2)
    assert ev == []


def test_the_proxy_never_judges_a_turn_by_the_reply_to_a_later_untrainable_answer(stack, script):
    session = "untrainable-retry"
    first = msgs(("user", "What is 2 + 2?"))
    assert post(stack, {"messages": first, "session_id": session}).status_code == 200
    script["answer"] = _answer(output_token_logprobs=[[0.5, 5, None]])   # log-prob > 0
    assert post(stack, {"messages": first, "session_id": session}).status_code == 200
    script["answer"] = GOOD
    then = first + msgs(("assistant", "hi"), ("user", "Thanks, that is correct!"))
    assert post(stack, {"messages": then, "session_id": session}).status_code == 200
    assert post(stack, {"session_id": session, "session_done": True}).status_code == 200
    settled(stack)
    got = leased(stack, session)
    assert got == [], [(s.turn_index, s.reward, s.metadata) for s in got]


@pytest.mark.parametrize("logp", [float("-inf"), float("nan")], ids=["minus-inf", "nan"])
def test_a_non_finite_policy_log_prob_is_answered_in_strict_json(stack, script, logp):
    """A token the policy drew at log-prob −inf (or NaN) is not trainable, but the agent still
    gets its answer, and in JSON a strict parser reads: −inf as OpenAI's −9999.0 (a negligible
    probability), NaN as null, never the non-JSON `-Infinity` / `NaN`."""
    script["answer"] = _answer(output_token_logprobs=[[logp, 5, None]])
    r = post(stack, {"messages": msgs(("user", "hi")), "logprobs": True})
    assert r.status_code == 200, r.text

    def refuse(constant):
        raise AssertionError(f"not JSON: {constant} in {r.text}")

    body = json.loads(r.text, parse_constant=refuse)
    got = body["choices"][0]["logprobs"]["content"][0]["logprob"]
    assert got == (-9999.0 if logp == float("-inf") else None), body


def test_a_close_only_call_for_a_session_no_longer_open_opens_no_episode(stack, script):
    """The runner's close-only form (`session_done`, the last next state as `messages`,
    `max_tokens: 0`) for a session the proxy no longer holds (expired, or already closed):
    nothing is pending, so nothing opens, and no empty episode is counted."""
    session = "closed-twice"
    first = msgs(("user", "What is 2 + 2?"))
    assert post(stack, {"messages": first, "session_id": session, "episode": True}).status_code \
        == 200
    close = {"messages": first + msgs(("assistant", "hi"), ("user", "ok")), "session_id": session,
             "session_done": True, "max_tokens": 0, "episode": True}
    assert post(stack, close).status_code == 200
    before = settled(stack)
    assert post(stack, close).status_code == 200  # again: the session is gone
    after = settled(stack)
    assert after["episodes"] == before["episodes"] and after["sessions_open"] == 0, after


@pytest.mark.parametrize("argv, reason", [
    (["--temperature", "nan"], "--temperature nan: expected a finite number >= 0"),
    (["--temperature", "-1"], "--temperature -1.0: expected a finite number >= 0"),
    (["--temperature", "inf"], "--temperature inf: expected a finite number >= 0"),
    (["--max-tokens", "0"], "--max-tokens 0: expected >= 1"),
    (["--max-tokens", "-3"], "--max-tokens -3: expected >= 1"),
])
def test_agents_refuse_sampling_arguments_every_request_would_fail_on(argv, reason, capsys):
    """Otherwise the proxy refuses (or cannot train) every request, and the agents run on,
    counting an error per episode, forever."""
    with pytest.raises(SystemExit) as exit_info:
        agents.parse_args(["--proxy-url", "http://127.0.0.1:1", "--tasks", "t.jsonl",
                           "--stats", "s.json", *argv])
    assert exit_info.value.code == 2 and reason in capsys.readouterr().err
