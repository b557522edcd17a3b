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
from clawjax.rollout import prompts, rule_judge
from clawjax.rollout.proxy import ProxyConfig, ProxyThread
from clawjax.serving.launch import ServerThread, free_port, make_context
from test_serving_helpers import hf_model, make_model_dir, token_logps

TOL = 1e-4


class AppThread:
    """An aiohttp app on its own loop in a daemon thread."""

    def __init__(self, app: web.Application):
        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

        async def up():
            self.runner = web.AppRunner(self.app, access_log=None)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        asyncio.run_coroutine_threadsafe(up(), self.loop).result(30)

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


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
    main = ProxyThread(ProxyConfig(**base)).start()
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
    # The teacher context differs from the plain prompt, so the check is not vacuous.
    plain = token_logps(hf, s.tokens.tolist(), s.prompt_len)
    assert np.max(np.abs(plain - ref)) > 1e-3


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
