"""Streamed chats through the rollout proxy carry the log-probs the request asks for, as
OpenAI's chat API and the embedded server stream them: with `logprobs: true` the
`choices[0].logprobs.content` lists of the chunks, joined, are the non-streamed
`logprobs.content` of the same generation; without it every chunk has `logprobs: null`.
The proxy runs against a scripted `/generate` on loopback (real HTTP); only a tokenizer is
needed (a character-level one: "H", "i", "!" are the tokens 49, 24, 68)."""

from __future__ import annotations

import json

import httpx
import pytest

from scripted_upstream import proxy_stack, script_for_one_test

TOKENS = [(49, "H", -0.25), (24, "i", -0.5), (68, "!", -1.0)]  # (id, text, logprob)
RIVALS = [(16, -2.0), (17, -3.0)]                                # top alternatives (a, b)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from proxy_stack(tmp_path_factory, "stream_logprobs")


@pytest.fixture
def script(stack):
    """The policy's script, reset to a good plain answer after each test."""
    yield from script_for_one_test(stack)


def event(upto: int, start: int = 0) -> dict:
    """A `/generate` stream event after the first `upto` tokens, as SGLang sends it: text,
    `completion_tokens` and (`meta_info`) `prompt_tokens` cumulative; `output_ids` and the
    log-prob lists from token `start` on (0: a cumulative event; `upto - 1`: an incremental
    one, `incremental_streaming_output`)."""
    done = TOKENS[start:upto]
    return {"text": "".join(t for _, t, _ in TOKENS[:upto]), "output_ids": [i for i, _, _ in done],
            "meta_info": {
                "output_token_logprobs": [[lp, i, None] for i, _, lp in done],
                "output_top_logprobs": [[[lp, i, None]] + [[r, j, None] for j, r in RIVALS]
                                        for i, _, lp in done],
                "finish_reason": {"type": "stop"} if upto == len(TOKENS) else None,
                "weight_version": "1", "prompt_tokens": 3, "completion_tokens": upto}}


def chat(stack, **fields) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "hello"}], **fields}
    return httpx.post(stack["proxy"].url + "/v1/chat/completions", json=body, timeout=60)


def chunks(stack, **fields) -> list[dict]:
    """The SSE chunks of a streamed chat (the `[DONE]` marker left out)."""
    r = chat(stack, stream=True, **fields)
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines()
            if line.startswith("data: ") and line[6:] != "[DONE]"]


@pytest.mark.parametrize("incremental, stop", [(False, None), (False, "!?"), (True, None),
                                               (True, "!?")],
                         ids=["cumulative", "cumulative-held-tail", "incremental",
                              "incremental-held-tail"])
def test_streamed_chunks_carry_the_log_probs_of_the_non_streamed_answer(stack, script,
                                                                        incremental, stop):
    """Joined, the streamed `logprobs.content` lists are the non-streamed one (tokens,
    log-probs, bytes, top log-probs), each token once. Each text chunk carries the entries of
    the tokens generated so far and not yet sent (the first one: "H"); a tail held back for a
    stop string ("!" may start "!?") leaves its entries to the closing chunks."""
    script["answer"] = event(len(TOKENS))
    script["stream"] = [json.dumps(event(n, n - 1 if incremental else 0))
                        for n in range(1, len(TOKENS) + 1)]
    extra = {"stop": stop} if stop else {}
    plain = chat(stack, logprobs=True, top_logprobs=2, **extra).json()
    want = plain["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in want] == ["H", "i", "!"]
    assert [len(e["top_logprobs"]) for e in want] == [3, 3, 3]
    got = chunks(stack, logprobs=True, top_logprobs=2, **extra)
    lists = [c["choices"][0]["logprobs"] for c in got if c["choices"]]
    streamed = [e for lp in lists if lp is not None for e in lp["content"]]
    assert streamed == want
    assert lists[0] == {"content": want[:1]}, lists   # sent as generated, not all at the end
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in got if c["choices"])
    assert text == plain["choices"][0]["message"]["content"] == "Hi!"


def test_a_stream_without_logprobs_has_null_logprobs_in_every_chunk(stack, script):
    script["stream"] = [json.dumps(event(n)) for n in range(1, len(TOKENS) + 1)]
    got = chunks(stack, stream_options={"include_usage": True})
    assert len(got) >= 3
    assert all(c["choices"][0]["logprobs"] is None for c in got if c["choices"]), got


def test_a_malformed_streamed_log_prob_still_ends_the_stream_with_a_502(stack, script):
    """Stream events are not checked as they come (the final answer is): a bad token id in an
    event's log-probs is read by no chunk, and the stream ends with the 502 naming it."""
    bad = event(1)
    bad["meta_info"]["output_token_logprobs"][0][1] = None
    script["stream"] = [json.dumps(bad)]
    got = chunks(stack, logprobs=True, top_logprobs=2)
    errors = [c["error"] for c in got if "error" in c]
    assert errors and errors[0]["code"] == 502, got
    assert errors[0]["param"] == "meta_info.output_token_logprobs[0]", errors
    assert all(c["choices"][0]["logprobs"] == {"content": []} for c in got if c.get("choices"))
