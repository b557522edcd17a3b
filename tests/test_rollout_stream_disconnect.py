"""An agent that closes its connection while the rollout proxy streams its answer is an
ordinary disconnect, not a proxy failure: no "handler failed" ERROR traceback, no 500 built for
a client that is gone, and the proxy keeps serving. The proxy runs against a scripted
`/generate` on loopback (real HTTP); only a tokenizer is needed."""

from __future__ import annotations

import json
import logging
import socket
import time

import httpx
import pytest

from scripted_upstream import GOOD, proxy_stack, script_for_one_test

TOKENS = 1000  # stream events: the proxy is still writing chunks when the agent has gone


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from proxy_stack(tmp_path_factory, "stream_disconnect")


@pytest.fixture
def script(stack):
    yield from script_for_one_test(stack)


def event(n: int) -> dict:
    """The SGLang stream event of token `n` (1-based): cumulative text, incremental ids."""
    return {"text": "x" * n, "output_ids": [5], "meta_info": {
        "output_token_logprobs": [[-0.1, 5, None]], "weight_version": "1",
        "finish_reason": {"type": "length"} if n == TOKENS else None,
        "prompt_tokens": 3, "completion_tokens": n}}


def proxy_errors(records) -> list[str]:
    """The ERROR records of the proxy: its own, and aiohttp's for a proxy handler (the scripted
    policy's write to the call the proxy cancels logs one of its own: not the proxy's)."""
    text = logging.Formatter().formatException
    return [r.getMessage() for r in records if r.levelno >= logging.ERROR and (
        r.name.startswith("clawjax") or r.exc_info and "clawjax/rollout" in text(r.exc_info))]


def test_an_agent_leaving_mid_stream_is_no_proxy_error(stack, script, caplog):
    caplog.set_level(logging.INFO, logger="clawjax.rollout.proxy")
    script["stream"] = [json.dumps(event(n)) for n in range(1, TOKENS + 1)]
    url = stack["proxy"].url
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True,
                       "session_id": "leaves", "session_done": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as agent:
        agent.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
                      b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                      % len(body) + body)
        assert agent.recv(300).startswith(b"HTTP/1.1 200")  # the stream began: now leave
    # The handler is over once its session (session_done) is closed.
    deadline = time.monotonic() + 60
    while httpx.get(url + "/stats", timeout=60).json()["sessions_open"]:
        assert time.monotonic() < deadline, "the stream's handler never ended"
        time.sleep(0.01)
    errors = proxy_errors(caplog.records)
    assert errors == [], errors
    assert any("stream client disconnected" in r.getMessage() for r in caplog.records)
    script["stream"] = [json.dumps({**GOOD, "text": "x"})]
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
