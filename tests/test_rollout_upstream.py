"""The rollout proxy against a policy server that misbehaves: a scripted `/generate` on loopback
(real HTTP), with the rule judge and a real gRPC buffer behind the proxy. Only a tokenizer is
needed (the proxy applies the chat template itself), so no model is compiled here."""

from __future__ import annotations

import json

import httpx
import pytest

from clawjax.buffer import BufferClient
from scripted_upstream import proxy_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from proxy_stack(tmp_path_factory, "upstream")


GOOD_EVENT = json.dumps({"text": "hi", "output_ids": [5], "meta_info": {
    "output_token_logprobs": [[-0.1, 5, None]], "weight_version": "1",
    "finish_reason": {"type": "stop"}, "completion_tokens": 1}})


@pytest.mark.parametrize("events", [["{not json"], [GOOD_EVENT, "{not json"], ["[1, 2]"]],
                         ids=["bad-json-first", "bad-json-later", "not-an-object"])
def test_a_malformed_policy_stream_ends_the_request_with_an_error(stack, events):
    """Whatever the policy server streams, the agent gets an answer (here an error naming the
    upstream: 502, or 503 once the fleet has taken the server that sent a malformed stream for
    an unavailable one and found no other), the request ends and its session is not kept in
    flight."""
    stack["script"]["stream"] = events
    session = f"bad-stream-{events[-1][:3]}-{len(events)}"
    r = httpx.post(stack["proxy"].url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "session_id": session})
    if r.status_code == 200:     # the stream had started: the error is its last event
        assert '"error"' in r.text and "policy server" in r.text, r.text
    else:
        assert r.status_code in (502, 503), r.text
        error = r.json()["error"]
        assert error["param"] == "model" and "policy server" in error["message"], error
    # The proxy still serves, and the failed request ended (the session closes at once).
    done = httpx.post(stack["proxy"].url + "/v1/chat/completions", timeout=60, json={
        "session_id": session, "session_done": True})
    assert done.status_code == 200 and done.json()["object"] == "session.done"
    snapshot = httpx.get(stack["proxy"].url + "/stats", params={"idle_timeout": 30},
                         timeout=60).json()
    assert snapshot["sessions_open"] == 0, snapshot


@pytest.mark.parametrize("value", ["nan", "NaN", "soon"])
def test_stats_refuses_an_idle_timeout_that_is_not_a_number_of_seconds(stack, value):
    """`?idle_timeout=nan` would never reach its deadline (every comparison with NaN is False):
    the wait is unbounded. It is refused like any other non-number."""
    r = httpx.get(stack["proxy"].url + "/stats", params={"idle_timeout": value}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "idle_timeout" and value in error["message"], error


def test_a_retried_turn_is_not_judged_against_the_message_it_answered(stack):
    """An agent whose HTTP client re-sends a request (a timeout retry) gets a second answer;
    the first answer's turn must not be judged with the retried request's last user message
    (which came before it) as its next state. Only turn 0 has a real next state here."""
    url = stack["proxy"].url + "/v1/chat/completions"
    session = "retried"
    first = [{"role": "user", "content": "What is 2 + 2?"}]
    second = first + [{"role": "assistant", "content": "hi"},
                      {"role": "user", "content": "That's wrong. Please give only the number."}]
    for messages in (first, second, second):      # the last call is the client's retry
        r = httpx.post(url, timeout=60, json={"messages": messages, "session_id": session})
        assert r.status_code == 200, r.text
    r = httpx.post(url, timeout=60, json={"session_id": session, "session_done": True})
    assert r.status_code == 200, r.text
    snapshot = httpx.get(stack["proxy"].url + "/stats", params={"idle_timeout": 60},
                         timeout=90).json()
    assert snapshot["idle"] is True
    client = BufferClient(stack["address"])
    try:
        got = [s for s in client.lease(1000, timeout_s=1.0) if s.session_id == session]
    finally:
        client.close()
    assert sorted(s.turn_index for s in got) == [0], [(s.turn_index, s.kind) for s in got]
    assert snapshot["judged_turns"] >= 1 and snapshot["drops"]["no_next_state"] >= 2, snapshot


def _event(text: str, ids: list[int], finish=None) -> str:
    return json.dumps({"text": text, "output_ids": ids, "meta_info": {
        "output_token_logprobs": [[-0.1, t, None] for t in ids], "weight_version": "1",
        "finish_reason": finish, "completion_tokens": len(ids)}})


def _streamed_content(stack, **extra) -> str:
    r = httpx.post(stack["proxy"].url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True, **extra})
    assert r.status_code == 200, r.text
    content = ""
    for line in r.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                content += choice["delta"].get("content") or ""
    return content


@pytest.mark.parametrize("texts, final, stop", [
    # A stop string of two characters: its first one went out before the second matched, and
    # the final text is trimmed (what the embedded server sends, and SGLang's detokenizer).
    (["ab", "abx"], "ab", ["xy"]),
    # A multi-byte character split over two tokens decodes as U+FFFD until its second token.
    (["caf\ufffd"], "caf\u00e9!", None),
], ids=["stop-string-trimmed", "split-utf8-character"])
def test_streamed_text_is_each_piece_once_and_ends_as_the_final_text(stack, texts, final, stop):
    """The chunks of a stream add up to the response text; nothing already sent is re-sent."""
    events = [_event(text, list(range(5, 6 + i))) for i, text in enumerate(texts)]
    events.append(_event(final, list(range(5, 6 + len(texts))), {"type": "stop"}))
    stack["script"]["stream"] = events
    extra = {"stop": stop} if stop else {}
    assert _streamed_content(stack, **extra) == final


@pytest.mark.parametrize("lengths,sent", [
    ({}, None),                                       # SGLang chat: the rest of the context
    ({"max_tokens": 7}, 7),
    ({"max_completion_tokens": 5, "max_tokens": 3}, 5),   # max_completion_tokens wins
    ({"max_tokens": None}, None),
])
def test_the_length_a_chat_request_sets_reaches_generate_as_sglang_chat_sends_it(
        stack, lengths, sent):
    """A chat request without a length is sent to `/generate` with `max_new_tokens: null` (what
    SGLang's own chat does: only the context caps it), not left out (which `/generate` reads as
    its default of 128 tokens)."""
    r = httpx.post(stack["proxy"].url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], **lengths})
    assert r.status_code == 200, r.text
    params = stack["script"]["last_body"]["sampling_params"]
    assert "max_new_tokens" in params and params["max_new_tokens"] == sent, params
