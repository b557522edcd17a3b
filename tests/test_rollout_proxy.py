"""The rollout proxy end to end, with real servers on loopback: the embedded JAX policy server
(tiny Qwen3 + local tokenizer), the rule judge, a gRPC buffer; HF torch as the log-prob
reference. One set of servers per module (one compile)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import numpy as np
import pytest
from aiohttp import web

from clawjax.buffer import BufferClient, BufferServer
from clawjax.rollout import prompts, rule_judge, runner
from clawjax.rollout.envs.base import Environment, Observation
from clawjax.rollout.proxy import ProxyConfig, ProxyThread
from clawjax.serving.launch import ServerThread, free_port, make_context
from scripted_upstream import AppThread
from test_serving_helpers import hf_logp, hf_model, make_model_dir, token_logps

TOL = 1e-4
TOPK = 3  # the main proxy asks the teacher for its top-3 at each response token (SPEC §5)


def bad_teacher_app() -> web.Application:
    """Answers every /generate without input_token_logprobs (a teacher that fails)."""
    app = web.Application()

    async def health(request):
        return web.Response(text="")

    async def generate(request):
        return web.json_response({"text": "", "output_ids": [],
                                  "meta_info": {"weight_version": "0", "id": "x"}})
    app.router.add_get("/health", health)
    app.router.add_post("/generate", generate)
    return app


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("rollout_model"), seed=3)


@pytest.fixture(scope="module")
def hf(model_dir):
    return hf_model(model_dir)


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    policy = ServerThread(make_context(str(model_dir), max_batch=8, context_len=512)).start()
    judge = AppThread(rule_judge.build_app())
    teacher = AppThread(bad_teacher_app())
    buffer = BufferServer(tmp_path_factory.mktemp("rollout_buffer"), fsync=False)
    address = f"127.0.0.1:{buffer.start()}"
    base = dict(model_dir=str(model_dir), policy_urls=[policy.url], judge_url=judge.url + "/v1",
                buffer=address, method="combine", prm_m=3)
    main = ProxyThread(ProxyConfig(**base, teacher_topk=TOPK)).start()
    other = ProxyThread(ProxyConfig(**{**base, "prm_m": 1}, teacher_urls=[teacher.url],
                                    session_expiry_s=0.5, api_key="sekret")).start()
    collected: dict[str, list] = {}
    yield dict(policy=policy, main=main, other=other, address=address, collected=collected)
    for s in (main, other):
        s.stop()
    buffer.stop()
    for s in (judge, teacher):
        s.stop()
    policy.stop()


def post(url, body, headers=None, key=None):
    h = dict(headers or {})
    if key:
        h["Authorization"] = f"Bearer {key}"
    return httpx.post(url + "/v1/chat/completions", json=body, headers=h, timeout=120)


def chat(url, messages, session=None, done=False, key=None, **extra):
    body = {"messages": messages, "max_tokens": 6, "temperature": 1.0, **extra}
    if session is not None:
        body["session_id"] = session
    if done:
        body["session_done"] = True
    r = post(url, body, key=key)
    assert r.status_code == 200, r.text
    return r.json()


def stats(proxy: ProxyThread, key=None) -> dict:
    h = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(proxy.url + "/stats", params={"idle_timeout": 60}, headers=h, timeout=90)
    assert r.status_code == 200, r.text
    assert r.json()["idle"] is True
    return r.json()


def samples(servers, proxy, session: str, key=None) -> list:
    """Every sample the buffer holds for `session` (after the proxy went idle)."""
    stats(proxy, key)
    return collect(servers, session)


def collect(servers, session: str) -> list:
    """Leases and acks everything in the buffer (kept by session); returns `session`'s."""
    client = BufferClient(servers["address"])
    try:
        while True:
            got = client.lease(1000, timeout_s=0.2)
            if not got:
                break
            client.ack([s.sample_id for s in got])
            for s in got:
                servers["collected"].setdefault(s.session_id, []).append(s)
    finally:
        client.close()
    return sorted(servers["collected"].get(session, []), key=lambda s: s.turn_index)


def reply(answer: dict) -> str:
    return answer["choices"][0]["message"]["content"]


def test_thanks_gives_an_rl_sample_with_reward_plus_one(servers, tok, hf):
    url = servers["main"].url
    first = [{"role": "user", "content": "What is 2+3?"}]
    a = chat(url, first, session="thanks")
    assert a["metadata"]["session_id"] == "thanks" and a["metadata"]["turn_index"] == 0
    before = stats(servers["main"])["drops"]["no_next_state"]
    chat(url, first + [{"role": "assistant", "content": reply(a)},
                       {"role": "user", "content": "Thanks, that is perfect."}],
         session="thanks", done=True)
    got = samples(servers, servers["main"], "thanks")
    assert len(got) == 1
    s = got[0].validate()
    assert (s.kind, s.reward, s.turn_index, s.teacher_logp) == ("rl", 1.0, 0, None)
    assert s.metadata["votes"] == "1,1,1" and s.metadata["next_state_role"] == "user"
    prompt = tok.apply_chat_template(first, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert s.tokens[:s.prompt_len].tolist() == prompt
    ids = s.tokens.tolist()
    np.testing.assert_allclose(s.rollout_logp, token_logps(hf, ids, s.prompt_len), atol=TOL)
    assert tok.decode(ids[s.prompt_len:], skip_special_tokens=True) == reply(a)
    assert stats(servers["main"])["drops"]["no_next_state"] == before + 1  # turn 1: last turn


def test_correction_gives_reward_minus_one_and_opd_with_hf_teacher_logprobs(servers, tok, hf):
    url = servers["main"].url
    first = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "What is 7+5?"}]
    # The first turn is streamed: the streamed path keeps the same turn data.
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
            "messages": first, "max_tokens": 6, "stream": True, "session_id": "fix",
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        events = [json.loads(line[5:]) for line in r.iter_lines()
                  if line.startswith("data:") and line[5:].strip() != "[DONE]"]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["usage"]["completion_tokens"] >= 1
    correction = "That's wrong. Please give only the final number, nothing else."
    chat(url, first + [{"role": "assistant", "content": text},
                       {"role": "user", "content": correction}], session="fix", done=True)
    got = samples(servers, servers["main"], "fix")
    assert len(got) == 1
    s = got[0].validate()
    assert (s.kind, s.reward) == ("both", -1.0)
    hint = "Please give only the final number, nothing else."
    assert s.metadata["hint"] == hint and s.metadata["votes"] == "-1,-1,-1"
    response = s.tokens[s.prompt_len:].tolist()
    assert tok.decode(response, skip_special_tokens=True) == text
    hinted = [first[0], {"role": "user", "content": first[1]["content"] + prompts.HINT_PREFIX
                         + hint}]
    t_prompt = tok.apply_chat_template(hinted, add_generation_prompt=True, tokenize=True)
    t_prompt = list(t_prompt["input_ids"] if hasattr(t_prompt, "keys") else t_prompt)
    ref = token_logps(hf, t_prompt + response, len(t_prompt))
    np.testing.assert_allclose(s.teacher_logp, ref, atol=TOL)
    # Top-K (SPEC §5): at each response position, the HF teacher's K most likely next tokens.
    rows = hf_logp(hf, t_prompt + response)[len(t_prompt) - 1:-1]          # [R, V] float64
    ref_ids = np.argsort(-rows, axis=1)[:, :TOPK]
    assert s.teacher_topk_ids.shape == (len(response), TOPK)
    np.testing.assert_array_equal(s.teacher_topk_ids, ref_ids)
    np.testing.assert_allclose(s.teacher_topk_logp, np.take_along_axis(rows, ref_ids, 1),
                               atol=TOL)
    # The teacher context differs from the plain prompt, so the check is not vacuous.
    plain = token_logps(hf, s.tokens.tolist(), s.prompt_len)
    assert np.max(np.abs(plain - ref)) > 1e-3


def test_an_episode_trains_each_step_on_outcome_plus_process_reward(servers):
    """SPEC §2, general agents: the episode's samples wait for its outcome, then each step's
    reward is r_outcome + r_process. Process rewards by the rule judge: +1 (tool OK), 0 (a
    neutral tool output), −1 (a correction); outcome 1 → totals 2, 1, 0. The middle step, which
    a chat session drops (zero reward), trains; the last (total 0, no hint) does not."""
    url = servers["main"].url
    messages = [{"role": "user", "content": "How many hours are in 2 days?"}]
    next_states = [("tool", "OK 24"), ("tool", "24 hours per day"),
                   ("user", "That's wrong.")]
    for i, (role, text) in enumerate(next_states):
        answer = chat(url, messages, session="episode-1", episode=True)
        assert answer["metadata"]["turn_index"] == i
        messages = messages + [{"role": "assistant", "content": reply(answer)},
                               {"role": role, "content": text}]
        if i == 1:  # judged turns are held until the episode ends
            assert samples(servers, servers["main"], "episode-1") == []
    before = stats(servers["main"])["episodes"]
    r = post(url, {"messages": messages, "max_tokens": 1, "session_id": "episode-1",
                   "session_done": True},
             headers={"X-Episode": "true", "X-Outcome-Reward": "1.0"})
    assert r.status_code == 200, r.text
    got = samples(servers, servers["main"], "episode-1")
    assert stats(servers["main"])["episodes"] == before + 1
    assert [(s.turn_index, s.kind, s.reward) for s in got] == [(0, "rl", 2.0), (1, "rl", 1.0)]
    for s, process in zip(got, (1.0, 0.0)):
        s.validate()
        assert s.metadata["outcome_reward"] == "1.0"
        assert float(s.metadata["process_reward"]) == process
        np.testing.assert_array_equal(s.step_rewards, [1.0, 0.0, -1.0])


def test_serving_goes_on_while_the_judge_loop_is_stuck(servers, monkeypatch):
    """Judging runs on its own thread and event loop: with that loop blocked outright (a
    synchronous wait inside judging, as heavy judge-side work would), chat requests are still
    answered; once it is released, the held turn is judged and emitted, nothing lost."""
    from clawjax.rollout import judge as judge_mod

    entered, gate = threading.Event(), threading.Event()
    real = judge_mod.judge_turn

    async def stuck(*args, **kwargs):
        entered.set()
        gate.wait(300)  # blocks the judge thread's whole event loop, not just this task
        return await real(*args, **kwargs)

    monkeypatch.setattr(judge_mod, "judge_turn", stuck)
    url = servers["main"].url
    try:
        first = [{"role": "user", "content": "What is 4+4?"}]
        a = chat(url, first, session="stuck")
        chat(url, first + [{"role": "assistant", "content": reply(a)},
                           {"role": "user", "content": "Thanks!"}], session="stuck", done=True)
        assert entered.wait(60), "turn 0 never reached the judge"
        for i in range(3):  # served while the judge loop cannot run at all (60 s < the gate)
            r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": f"Still there? {i}"}],
                "max_tokens": 4, "session_id": f"live{i}"})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        assert not gate.is_set()
    finally:
        gate.set()
    got = samples(servers, servers["main"], "stuck")
    assert [(s.turn_index, s.kind, s.reward) for s in got] == [(0, "rl", 1.0)]


def test_missing_teacher_logprobs_are_rejected_and_counted(servers):
    proxy, key = servers["other"], "sekret"
    before = stats(proxy, key)["drops"]["teacher_failure"]
    first = [{"role": "user", "content": "Name a colour."}]
    a = chat(proxy.url, first, session="bad-teacher", key=key)
    chat(proxy.url, first + [{"role": "assistant", "content": reply(a)},
                             {"role": "user", "content": "Wrong. Remember that I like blue."}],
         session="bad-teacher", done=True, key=key)
    got = samples(servers, proxy, "bad-teacher", key)
    assert [(s.kind, s.reward, s.teacher_logp) for s in got] == [("rl", -1.0, None)]
    after = stats(proxy, key)
    assert after["drops"]["teacher_failure"] == before + 1
    assert after["emitted"]["both"] == 0 and after["emitted"]["opd"] == 0


def test_session_fields_from_headers_side_turns_and_single_turn_sessions(servers):
    url = servers["main"].url
    first = [{"role": "user", "content": "Plan my day."}]
    r = post(url, {"messages": first, "max_tokens": 4}, headers={"X-Session-Id": "hdr"})
    assert r.status_code == 200 and r.json()["metadata"]["session_id"] == "hdr"
    # A side turn (a title call) that even ends in praise is neither trained nor a next state.
    side = first + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "Great!"}]
    r = post(url, {"messages": side, "max_tokens": 4, "session_id": "hdr"},
             headers={"X-Turn-Type": "side"})
    assert r.json()["metadata"] == {"weight_version": "default", "session_id": "hdr",
                                    "turn_index": 1, "turn_type": "side"}
    # The body wins over the headers: this request is main-line, belongs to "hdr" and does
    # not close it.
    nxt = first + [{"role": "assistant", "content": "y"},
                   {"role": "user", "content": "That's not right, try again."}]
    r = post(url, {"messages": nxt, "max_tokens": 4, "session_id": "hdr", "turn_type": "main",
                   "session_done": False},
             headers={"X-Session-Id": "elsewhere", "X-Turn-Type": "side",
                      "X-Session-Done": "true"})
    assert r.json()["metadata"]["turn_index"] == 2
    assert stats(servers["main"])["sessions_open"] >= 1
    no_next = stats(servers["main"])["drops"]["no_next_state"]
    # Close with the header on a close-only call (no messages): turn 2 gets no next state.
    r = post(url, {"max_tokens": 4}, headers={"X-Session-Id": "hdr", "X-Session-Done": "1"})
    assert r.json() == {"object": "session.done", "session_id": "hdr"}
    assert stats(servers["main"])["drops"]["no_next_state"] == no_next + 1
    got = samples(servers, servers["main"], "hdr")
    assert [(s.turn_index, s.kind, s.reward) for s in got] == [(0, "rl", -1.0)]
    assert samples(servers, servers["main"], "elsewhere") == []
    # A session of a single main turn is still trained (at-least-one guarantee).
    chat(url, [{"role": "user", "content": "Hello there."}], session="lone", done=True)
    got = samples(servers, servers["main"], "lone")
    assert [(s.turn_index, s.kind, s.reward, s.metadata["lone_turn"]) for s in got] == \
        [(0, "rl", 0.0, "1")]
    assert got[0].loss_mask.tolist() == [1.0] * got[0].response_len
    # Requests without a session are served, never trained.
    assert chat(url, [{"role": "user", "content": "hi"}])["metadata"] == \
        {"weight_version": "default"}


def test_idle_sessions_expire_like_session_done(servers):
    proxy, key = servers["other"], "sekret"
    chat(proxy.url, [{"role": "user", "content": "Expire me."}], session="idle", key=key)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not samples(servers, proxy, "idle", key):
        time.sleep(0.2)
    got = samples(servers, proxy, "idle", key)
    assert [(s.kind, s.reward, s.metadata["lone_turn"]) for s in got] == [("rl", 0.0, "1")]
    assert stats(proxy, key)["sessions_open"] == 0


class ScriptedEnv(Environment):
    """Answers every action with the next of `observations`; done (outcome 1.0) after the last."""
    name = "scripted"

    def __init__(self, observations, episode=False):
        self.observations, self.steps = list(observations), 0
        self.outcome_rewards = episode

    def reset(self, task):
        self.steps = 0
        return Observation("user", "How many hours are in 2 days?")

    def step(self, action):
        role, text = self.observations[self.steps]
        self.steps += 1
        done = self.steps == len(self.observations)
        return Observation(role, text), done, 1.0 if done else 0.0


def drops_but_no_hint(snapshot: dict) -> dict:
    """The drop counters but `no_valid_hint` (a rule-judge +1 on praise carries no hint)."""
    return {k: v for k, v in snapshot["drops"].items() if k != "no_valid_hint"}


def test_runner_episodes_close_with_their_last_next_state_and_no_spurious_turn(servers):
    """The runner's close call delivers the last observation as the last turn's next state and
    adds no turn: every turn is judged, nothing is counted under no_next_state, no lone turn."""
    proxy = servers["main"]
    before = stats(proxy)
    results = runner.run_episodes(
        proxy.url, [(ScriptedEnv([("user", "Thanks, that is perfect.")]), {"task_id": "chat"}),
                    (ScriptedEnv([("tool", "OK 24"), ("tool", "OK 48")], episode=True),
                     {"task_id": "episode"})],
        session_prefix="runner", max_turns=4, sampling={"max_tokens": 4, "temperature": 1.0})
    assert [(r.error, r.turns, r.done) for r in results] == [(None, 1, True), (None, 2, True)]
    after = stats(proxy)
    assert after["judged_turns"] - before["judged_turns"] == 3
    assert drops_but_no_hint(after) == drops_but_no_hint(before)  # no no_next_state, none lost
    assert after["drops"]["no_valid_hint"] - before["drops"]["no_valid_hint"] == 3
    assert after["lone_turns"] == before["lone_turns"]
    assert after["episodes"] - before["episodes"] == 1
    assert after["served"]["main"] - before["served"]["main"] == 3   # the close is not a turn
    assert after["sessions_open"] == before["sessions_open"]
    chat_samples = samples(servers, proxy, "runner-0")
    assert [(s.turn_index, s.kind, s.reward) for s in chat_samples] == [(0, "rl", 1.0)]
    episode = samples(servers, proxy, "runner-1")
    assert [(s.turn_index, s.kind, s.reward) for s in episode] == [(0, "rl", 2.0), (1, "rl", 2.0)]


def test_a_close_only_call_may_carry_the_last_next_state(servers):
    """`session_done` + `messages` + `max_tokens: 0` (headers or body) generates nothing: the
    trailing messages judge the pending turn and the session closes."""
    proxy = servers["main"]
    first = [{"role": "user", "content": "What is 6+1?"}]
    a = chat(proxy.url, first, session="close-only")
    before = stats(proxy)
    r = post(proxy.url, {"messages": first + [{"role": "assistant", "content": reply(a)},
                                              {"role": "user", "content": "Great, thanks!"}],
                         "max_tokens": 0, "stream": True},
             headers={"X-Session-Id": "close-only", "X-Session-Done": "true"})
    assert r.status_code == 200 and r.json() == {"object": "session.done",
                                                 "session_id": "close-only"}
    after = stats(proxy)
    assert drops_but_no_hint(after) == drops_but_no_hint(before)
    assert after["served"] == before["served"]
    assert after["judged_turns"] - before["judged_turns"] == 1
    got = samples(servers, proxy, "close-only")
    assert [(s.turn_index, s.kind, s.reward) for s in got] == [(0, "rl", 1.0)]


def test_fifty_concurrent_sessions_keep_their_turns_apart(servers, tok):
    url, n = servers["main"].url, 50

    async def session(client, i):
        sid = f"many-{i}"
        first = [{"role": "user", "content": f"Task {i}: add {i} and 1."}]
        body = {"messages": first, "max_tokens": 4, "session_id": sid}
        a = (await client.post("/v1/chat/completions", json=body)).json()
        verdict = "Thanks, great." if i % 2 else "No, that is wrong."
        body = {"messages": first + [{"role": "assistant", "content": reply(a)},
                                     {"role": "user", "content": f"{verdict} ({i})"}],
                "max_tokens": 4, "session_id": sid, "session_done": True}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return reply(a)

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            return await asyncio.gather(*(session(client, i) for i in range(n)))
    replies = asyncio.run(main())
    for i in range(n):
        got = samples(servers, servers["main"], f"many-{i}")
        assert len(got) == 1, i
        s = got[0].validate(vocab_size=len(tok))
        assert s.session_id == f"many-{i}" and s.turn_index == 0
        assert s.reward == (1.0 if i % 2 else -1.0)
        assert f"Task {i}: add {i} and 1." in tok.decode(s.tokens[:s.prompt_len].tolist())
        assert tok.decode(s.tokens[s.prompt_len:].tolist(), skip_special_tokens=True) \
            == replies[i]


def test_bad_requests_get_openai_errors_naming_the_field(servers):
    url, ok = servers["main"].url, [{"role": "user", "content": "hi"}]
    cases = [
        ({"messages": []}, {}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, {}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, {}, "messages[0].content"),
        ({"messages": ok, "max_tokens": -1}, {}, "max_tokens"),
        ({"messages": ok, "temperature": "hot"}, {}, "temperature"),
        ({"messages": ok, "n": 2}, {}, "n"),
        ({"messages": ok, "turn_type": "aside", "session_id": "b"}, {}, "turn_type"),
        ({"messages": ok, "session_id": ""}, {}, "session_id"),
        ({"messages": ok, "session_id": "é" * 200}, {}, "session_id"),
        ({"messages": ok, "session_done": "yes", "session_id": "b"}, {}, "session_done"),
        ({"messages": ok}, {"X-Session-Done": "maybe", "X-Session-Id": "b"}, "X-Session-Done"),
        ({"messages": ok}, {"X-Turn-Type": "x"}, "X-Turn-Type"),
        ({"messages": ok, "episode": "yes", "session_id": "b"}, {}, "episode"),
        ({"messages": ok, "session_id": "b"}, {"X-Episode": "perhaps"}, "X-Episode"),
        ({"messages": ok, "session_id": "b", "outcome_reward": "1"}, {}, "outcome_reward"),
        ({"messages": ok, "session_id": "b", "outcome_reward": True}, {}, "outcome_reward"),
        ({"session_id": "b", "session_done": True, "outcome_reward": [1.0]}, {},
         "outcome_reward"),
        ({"messages": ok, "session_id": "b"}, {"X-Outcome-Reward": "nan"}, "X-Outcome-Reward"),
        ({"messages": ok, "session_id": "b"}, {"X-Outcome-Reward": "high"}, "X-Outcome-Reward"),
        ({"messages": ok, "max_tokens": 100000}, {}, "max_tokens"),  # refused by the server
        ({"messages": ok, "max_tokens": 100000, "stream": True}, {}, "max_tokens"),
        # the field the request used (max_completion_tokens wins over max_tokens)
        ({"messages": ok, "max_completion_tokens": -1}, {}, "max_completion_tokens"),
        ({"messages": ok, "max_tokens": 4, "max_completion_tokens": 100000}, {},
         "max_completion_tokens"),
        ({"messages": ok, "max_completion_tokens": 100000, "stream": True}, {},
         "max_completion_tokens"),
        ([1, 2], {}, "body"),
    ]
    for body, headers, field in cases:
        r = post(url, body, headers)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == field and field in err["message"] and err["code"] == 400, err
        assert set(err) == {"message", "type", "param", "code"}
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    other = servers["other"].url
    r = post(other, {"messages": ok})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(other + "/health").status_code == 200
    assert httpx.get(other + "/v1/models").status_code == 401
    models = httpx.get(other + "/v1/models", headers={"Authorization": "Bearer sekret"}).json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert chat(url, ok)["choices"][0]["message"]["role"] == "assistant"  # still serving


def test_greedy_stream_and_plain_completion_agree(servers):
    url, msgs = servers["main"].url, [{"role": "user", "content": "Count to three."}]
    plain = chat(url, msgs, temperature=0.0, max_tokens=8, logprobs=True)
    lps = plain["choices"][0]["logprobs"]["content"]
    assert len(lps) == plain["usage"]["completion_tokens"] and all(e["logprob"] <= 0 for e in lps)
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
            "messages": msgs, "max_tokens": 8, "temperature": 0.0, "stream": True}) as r:
        chunks = [json.loads(line[5:]) for line in r.iter_lines()
                  if line.startswith("data:") and line[5:].strip() != "[DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == reply(plain)
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


def test_a_stream_cut_by_a_stop_string_adds_up_to_the_plain_text(servers):
    """A two-character stop string whose first character is streamed before the second one
    matches: the embedded server trims it from the final text; the streamed chunks must still
    add up to exactly that text (nothing sent twice, no piece of the stop string)."""
    url, msgs = servers["main"].url, [{"role": "user", "content": "Say something."}]
    greedy = dict(temperature=0.0, max_tokens=12, ignore_eos=True)
    text = reply(chat(url, msgs, **greedy))
    at = next((p for p in range(1, len(text) - 1) if text.find(text[p:p + 2]) == p), None)
    assert at is not None, text
    stop = text[at:at + 2]
    plain = reply(chat(url, msgs, stop=[stop], **greedy))
    assert plain == text[:at]
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
            "messages": msgs, "stream": True, "stop": [stop], **greedy}) as r:
        chunks = [json.loads(line[5:]) for line in r.iter_lines()
                  if line.startswith("data:") and line[5:].strip() != "[DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain


def _start(cmd: list[str], timeout: float = 120.0):
    import os
    import subprocess
    import sys
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", *cmd], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline, lines = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if line.startswith("READY"):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc
    proc.kill()
    raise RuntimeError("".join(lines[-30:]))


def test_command_lines_serve_a_session(servers, model_dir, tmp_path):
    import signal
    judge_port, proxy_port = free_port(), free_port()
    judge = _start(["clawjax.rollout.rule_judge", "--port", str(judge_port)])
    (tmp_path / "token").write_text("")  # an empty token file means no token
    proxy = None
    try:
        proxy = _start(["clawjax.rollout", "serve", "--port", str(proxy_port),
                        "--model-dir", str(model_dir), "--policy-url", servers["policy"].url,
                        "--judge-url", f"http://127.0.0.1:{judge_port}", "--buffer",
                        servers["address"], "--buffer-token-file", str(tmp_path / "token"),
                        "--method", "rl", "--prm-m", "1", "--log-level", "warning"])
        url = f"http://127.0.0.1:{proxy_port}"
        first = [{"role": "user", "content": "Spell cat."}]
        a = chat(url, first, session="cli")
        chat(url, first + [{"role": "assistant", "content": reply(a)},
                           {"role": "user", "content": "Correct! Thank you."}],
             session="cli", done=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            s = httpx.get(url + "/stats", params={"idle_timeout": 30}, timeout=60).json()
            if s["emitted"]["rl"] == 1 and s["idle"]:
                break
        assert s["emitted"] == {"rl": 1, "opd": 0, "both": 0}, s
        assert s["rewards"]["1"] == 1 and s["drops"]["no_next_state"] == 1
    finally:
        for proc in (proxy, judge):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 0
    got = collect(servers, "cli")
    assert [(x.kind, x.reward, x.metadata["method"]) for x in got] == [("rl", 1.0, "rl")]


def test_a_policy_fleet_that_is_down_gives_503_and_the_proxy_stays_up(model_dir):
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = ProxyThread(ProxyConfig(model_dir=str(model_dir), policy_urls=[dead],
                                    judge_url=dead, buffer=f"127.0.0.1:{free_port()}")).start()
    try:
        r = post(proxy.url, {"messages": [{"role": "user", "content": "x"}],
                             "session_id": "down"})
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "service_unavailable"
        assert "policy" in r.json()["error"]["message"]
        assert httpx.get(proxy.url + "/health").status_code == 200
        assert httpx.get(proxy.url + "/stats").json()["drops"]["invalid"] == 0
    finally:
        proxy.stop()
