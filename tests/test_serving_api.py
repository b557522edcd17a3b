"""The embedded server against SGLang's and OpenAI's documented behaviour, over real HTTP on
loopback: a streamed chat completion's deltas add up to the non-streamed content (also when a
stop string spans several tokens), streamed chat chunks carry the requested log-probs, a stop
token id is trimmed from `text` (SGLang's detokenizer) but kept in `output_ids`, a chat
request without max_tokens may fill the context (SGLang) while `/generate` keeps 128,
`/v1/completions` answers like `/generate` (log-probs checked against HF torch), a weight
load the engine did not take in time is withdrawn, not installed later, an update without a
weight_version keeps the label current when it applies, a text prompt gets the tokenizer's
special tokens (a BOS) as in SGLang, chat tool calls reach the template (one it cannot render
is a 400), and a client that goes away aborts its own request only."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import httpx
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from clawjax import model as cm
from clawjax.serving.launch import ServerThread, make_context
from clawjax.tokenizer import IM_START

from test_serving_helpers import (gen, hf_a, hf_b, http, make_model_dir, model_a,  # noqa: F401
                                  model_b, server, stream_chat, token_logps, tokenizer)

TOL = 1e-4
CHAT = [{"role": "user", "content": "Hi!"}]


def content_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def test_streamed_chat_with_a_multi_token_stop_string_sends_no_text_twice(http):
    body = {"messages": CHAT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    # The char-level tokenizer makes a 2-character stop string span two tokens, so the first
    # one is generated (and may be streamed) before the match is known.
    at = next(i for i in range(2, len(full) - 1) if full.index(full[i:i + 2]) == i)
    stop = full[at:at + 2]
    ref = http.post("/v1/chat/completions", json={**body, "stop": [stop]}).json()
    assert ref["choices"][0]["message"]["content"] == full[:at]
    chunks = stream_chat(http, {**body, "stop": [stop]})
    assert content_of(chunks) == full[:at]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # without a stop string nothing is held back for good
    assert content_of(stream_chat(http, body)) == full


def test_streamed_chat_chunks_carry_the_requested_logprobs(http, hf_a, tokenizer):
    body = {"messages": CHAT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2}
    ref = http.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]
    assert len(ref["content"]) == 6
    chunks = stream_chat(http, body)
    streamed = [e for c in chunks if c["choices"]
                for e in ((c["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert [e["token"] for e in streamed] == [e["token"] for e in ref["content"]]
    np.testing.assert_allclose([e["logprob"] for e in streamed],
                               [e["logprob"] for e in ref["content"]], atol=1e-6)
    assert all(len(e["top_logprobs"]) == 2 for e in streamed)
    # and they are the model's: HF torch on the templated prompt + the greedy answer
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    out = gen(http, input_ids=prompt, sampling_params={"max_new_tokens": 6, "temperature": 0,
                                                       "ignore_eos": True})
    np.testing.assert_allclose([e["logprob"] for e in streamed],
                               token_logps(hf_a, prompt + out["output_ids"], len(prompt)),
                               atol=TOL)
    # without logprobs the chunks carry none
    plain = stream_chat(http, {k: v for k, v in body.items()
                               if k not in ("logprobs", "top_logprobs")})
    assert all(c["choices"][0]["logprobs"] is None for c in plain if c["choices"])


def test_a_matched_stop_token_id_is_trimmed_from_the_text(http, tokenizer):
    prompt = tokenizer.encode("Once upon")
    sp = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
    ids = gen(http, input_ids=prompt, sampling_params=sp)["output_ids"]
    # a stop token that decodes to visible text (not a special token)
    k = next(i for i in range(1, len(ids)) if tokenizer.decode([ids[i]],
                                                               skip_special_tokens=True))
    first = ids.index(ids[k])
    out = gen(http, input_ids=prompt, sampling_params={**sp, "stop_token_ids": [ids[k]]})
    assert out["output_ids"] == ids[:first + 1]  # kept in the ids (SGLang)
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[k]}
    assert out["text"] == tokenizer.decode(ids[:first], skip_special_tokens=True)
    # no_stop_trim keeps it in the text too
    out = gen(http, input_ids=prompt, sampling_params={**sp, "stop_token_ids": [ids[k]],
                                                       "no_stop_trim": True})
    assert out["text"] == tokenizer.decode(ids[:first + 1], skip_special_tokens=True)
    # the chat content follows the same rule
    body = {"messages": CHAT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    chat_prompt = tokenizer.encode(tokenizer.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    cids = gen(http, input_ids=chat_prompt, sampling_params={
        "max_new_tokens": 8, "temperature": 0, "ignore_eos": True})["output_ids"]
    j = next(i for i in range(1, len(cids)) if tokenizer.decode([cids[i]],
                                                                skip_special_tokens=True))
    stop_at = cids.index(cids[j])
    r = http.post("/v1/chat/completions", json={**body, "stop_token_ids": [cids[j]]}).json()
    assert r["choices"][0]["message"]["content"] == tokenizer.decode(
        cids[:stop_at], skip_special_tokens=True)
    assert content_of(stream_chat(http, {**body, "stop_token_ids": [cids[j]]})) == \
        r["choices"][0]["message"]["content"]


def test_chat_without_max_tokens_may_fill_the_context_and_generate_keeps_128(http):
    # SGLang: chat without max_tokens / max_completion_tokens sends max_new_tokens = None,
    # which the scheduler caps by the context only; /generate keeps SamplingParams' 128.
    body = {"messages": CHAT, "temperature": 0, "ignore_eos": True}
    r = http.post("/v1/chat/completions", json=body).json()
    usage = r["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 256  # the server's context
    assert usage["completion_tokens"] > 128
    assert r["choices"][0]["finish_reason"] == "length"
    chunks = stream_chat(http, {**body, "stream_options": {"include_usage": True}})
    assert chunks[-1]["usage"] == usage
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    out = gen(http, input_ids=[1, 2, 3], sampling_params={"temperature": 0, "ignore_eos": True})
    assert len(out["output_ids"]) == 128
    # An explicit null is SGLang's "no limit but the context" (what its chat sends /generate).
    out = gen(http, input_ids=[1, 2, 3], sampling_params={"temperature": 0, "ignore_eos": True,
                                                          "max_new_tokens": None})
    assert len(out["output_ids"]) == 256 - 3


def test_max_completion_tokens_wins_over_max_tokens(http):
    # SGLang's chat adapter: max_new_tokens = max_completion_tokens or max_tokens.
    body = {"messages": CHAT, "temperature": 0, "ignore_eos": True}
    both = http.post("/v1/chat/completions",
                     json={**body, "max_tokens": 3, "max_completion_tokens": 5}).json()
    assert both["usage"]["completion_tokens"] == 5
    alone = http.post("/v1/chat/completions",
                      json={**body, "max_tokens": 3, "max_completion_tokens": None}).json()
    assert alone["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_chat_length_past_the_context_names_the_field_sent(http, key):
    r = http.post("/v1/chat/completions", json={"messages": CHAT, key: 10_000})
    assert r.status_code == 400
    assert r.json()["param"] == key, r.text
    assert "10000" in r.json()["message"] and "context length 256" in r.json()["message"]
    for bad in (-1, 1.5, "8"):   # refused before the context is considered, same field
        r = http.post("/v1/chat/completions", json={"messages": CHAT, key: bad})
        assert r.status_code == 400 and r.json()["param"] == key, (bad, r.text)
    r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": -1})
    assert r.status_code == 400 and r.json()["param"] == "max_tokens", r.text
    for body, field in (({"min_tokens": -1}, "min_tokens"), ({"seed": "x"}, "seed")):
        r = http.post("/v1/chat/completions", json={"messages": CHAT, **body})
        assert r.status_code == 400 and r.json()["param"] == field, r.text


# --- /v1/completions (OpenAI completions, as SGLang serves them) ------------------------------

def stream_completion(http, body: dict) -> list[dict]:
    chunks = []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunks.append(json.loads(line[5:]))
    return chunks


def test_v1_completions_match_generate_and_hf(http, hf_a, tokenizer):
    text = "The cat sat"
    prompt = tokenizer.encode(text, add_special_tokens=False)
    ref = gen(http, input_ids=prompt, sampling_params={"max_new_tokens": 6, "temperature": 0,
                                                       "ignore_eos": True})
    body = {"model": "m", "prompt": text, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "logprobs": 2}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == "m"
    choice = out["choices"][0]
    assert choice["text"] == ref["text"] and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 6,
                            "total_tokens": len(prompt) + 6}
    assert out["metadata"]["weight_version"] == "default"
    lp = choice["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([t]) for t in ref["output_ids"]]
    np.testing.assert_allclose(lp["token_logprobs"],
                               token_logps(hf_a, prompt + ref["output_ids"], len(prompt)),
                               atol=TOL)
    assert all(len(top) == 2 for top in lp["top_logprobs"])
    # token ids as the prompt give the same answer
    by_ids = http.post("/v1/completions", json={**body, "prompt": prompt}).json()
    assert by_ids["choices"][0]["text"] == ref["text"]
    # streamed: the deltas add up to the same text, the last chunk says why it ended
    chunks = stream_completion(http, {**body, "stream_options": {"include_usage": True}})
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == ref["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    streamed = [lp for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for lp in c["choices"][0]["logprobs"]["token_logprobs"]]
    np.testing.assert_allclose(streamed, lp["token_logprobs"], atol=1e-6)
    # logprobs = 0 asks for the sampled tokens' log-probs (no alternatives), streamed too
    zero = stream_completion(http, {**body, "logprobs": 0})
    assert sum(len(c["choices"][0]["logprobs"]["token_logprobs"]) for c in zero) == 6
    # the default max_tokens is OpenAI's and SGLang's 16
    plain = http.post("/v1/completions", json={"prompt": text, "ignore_eos": True}).json()
    assert plain["usage"]["completion_tokens"] == 16 and plain["choices"][0]["logprobs"] is None


def test_bad_v1_completions_get_400_naming_the_field(http):
    for body, field in (({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [[1, 2]]}, "prompt"),
                        ({}, "prompt"), ({"prompt": "a", "echo": True}, "echo"),
                        ({"prompt": "a", "n": 2}, "n"), ({"prompt": "a", "logprobs": -1},
                                                         "logprobs"),
                        ({"prompt": [1, 99999]}, "prompt[1]"),
                        ({"prompt": "a", "max_tokens": 10_000}, "max_tokens")):
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["param"] == field, (body, r.json())


# --- a weight load the engine did not take in time is not installed later -----------------------

def test_a_timed_out_weight_load_is_not_installed_later(server, http, model_b, hf_a, tokenizer,
                                                        monkeypatch):
    """`load_weights` gives up (TimeoutError, so /update_weights_from_disk answers success
    false) while the engine thread is busy in a step; once the step ends the engine must not
    switch to those weights anyway (the caller and the fleet think the old ones serve)."""
    engine = server.ctx.engine
    gate, entered = threading.Event(), threading.Event()
    decode = engine._run_decode

    def gated_decode(reqs):
        entered.set()
        gate.wait(60)
        decode(reqs)

    monkeypatch.setattr(engine, "_run_decode", gated_decode)
    ids = tokenizer.encode("Timed out load")
    model, config = cm.from_pretrained(str(model_b), dtype=jnp.float32)
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(gen, http, input_ids=ids, sampling_params={"max_new_tokens": 3,
                                                                    "ignore_eos": True})
        try:
            assert entered.wait(60)  # the engine thread is inside a decode step
            with pytest.raises(TimeoutError, match="not installed"):
                engine.load_weights(model, config, "late", timeout=0.3)
        finally:
            gate.set()
        assert len(fut.result(timeout=60)["output_ids"]) == 3
    out = gen(http, input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
              logprob_start_len=0)
    assert out["meta_info"]["weight_version"] == "default"
    assert engine.stats()["weight_version"] == "default"
    np.testing.assert_allclose([e[0] for e in out["meta_info"]["input_token_logprobs"][1:]],
                               token_logps(hf_a, ids, 1), atol=TOL)


# --- a tokenizer with a BOS and a chat template that renders tool calls --------------------------

TOOL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] -}}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{{- '<tool_call>' + call['function']['name'] + '</tool_call>' -}}{%- endfor -%}"
    "{%- if message.get('tool_call_id') -%}{{- ' (' + message['tool_call_id'] + ')' -}}"
    "{%- endif -%}{{- '<|im_end|>' + '\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    """(server, tokenizer) for a tiny model whose tokenizer adds a BOS (`<|im_start|>`, as a
    Llama 3 tokenizer adds its own) and whose chat template renders tool calls."""
    path = make_model_dir(tmp_path_factory.mktemp("custom"), seed=0)
    tok = AutoTokenizer.from_pretrained(str(path))
    bos = tok.convert_tokens_to_ids(IM_START)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{IM_START} $A", special_tokens=[(IM_START, bos)])
    tok.chat_template = TOOL_TEMPLATE
    tok.save_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    srv = ServerThread(make_context(str(path), max_batch=2, context_len=128)).start()
    yield srv, tok
    srv.stop()


def test_text_prompts_get_the_tokenizers_special_tokens(custom):
    """SGLang tokenizes `/generate` `text` (and a `/v1/completions` string prompt) with the
    tokenizer's defaults, so a tokenizer that adds a BOS (Llama 3) gets it: the same request
    must score the same tokens here."""
    srv, tok = custom
    expected = tok("abc")["input_ids"]
    assert expected[0] == tok.convert_tokens_to_ids(IM_START) and len(expected) == 4
    with httpx.Client(base_url=srv.url, timeout=120) as http:
        out = gen(http, text="abc", sampling_params={"max_new_tokens": 0},
                  return_logprob=True, logprob_start_len=0)
        assert [e[1] for e in out["meta_info"]["input_token_logprobs"]] == expected
        r = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 4


def test_chat_tool_calls_reach_the_chat_template(custom):
    """An assistant turn that called a tool, and the tool's answer: the template must see
    `tool_calls` and `tool_call_id` (SGLang passes them on), not a prompt without the call."""
    srv, tok = custom
    call = {"id": "c1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}
    messages = [{"role": "user", "content": "Time?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "12:00", "tool_call_id": "c1"}]
    as_rendered = [dict(m, content=m["content"] or "") for m in messages]
    expected = tok.encode(tok.apply_chat_template(as_rendered, tokenize=False,
                                                  add_generation_prompt=True),
                          add_special_tokens=False)
    with httpx.Client(base_url=srv.url, timeout=120) as http:
        r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(expected)
        r = http.post("/v1/chat/completions", json={"max_tokens": 1, "messages": [
            {"role": "assistant", "content": "x", "tool_calls": "clock()"}]})
        assert r.status_code == 400 and r.json()["param"] == "messages[0].tool_calls"
        # a call the template cannot render is the request's fault (400), not the server's
        r = http.post("/v1/chat/completions", json={"max_tokens": 1, "messages": [
            {"role": "assistant", "content": "x", "tool_calls": ["clock()"]}]})
        assert r.status_code == 400 and r.json()["param"] == "messages", r.text
        assert http.get("/health").status_code == 200


# --- an update without weight_version keeps the label current when it is applied -------------

def test_an_unversioned_update_queued_behind_another_keeps_the_newer_label(model_a, model_b,
                                                                           hf_b, tokenizer):
    """SGLang: an update without `weight_version` keeps the server's current label. When it
    waits behind an update to "5", the current label once it is applied is "5", not the one
    from before "5" (a label going backwards would mis-version every later response)."""
    ctx = make_context(str(model_a), max_batch=2, context_len=64)
    gate, entered, load = threading.Event(), threading.Event(), ctx.load_model

    def gated_load(path):
        if path == str(model_b):
            entered.set()
            gate.wait(60)
        return load(path)

    ctx.load_model = gated_load
    srv = ServerThread(ctx).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as http, cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(http.post, "/update_weights_from_disk",
                                json={"model_path": str(model_b), "weight_version": "5"})
            assert entered.wait(60)
            second = pool.submit(http.post, "/update_weights_from_disk",
                                 json={"model_path": str(model_b) + "/"})
            deadline = time.monotonic() + 30  # until the second waits for the first
            while not ctx.update_lock._waiters and time.monotonic() < deadline:
                time.sleep(0.01)
            assert ctx.update_lock._waiters
            gate.set()
            assert first.result(60).json()["success"] and second.result(60).json()["success"]
            assert http.get("/get_weight_version").json()["weight_version"] == "5"
            ids = tokenizer.encode("labels")
            out = gen(http, input_ids=ids, sampling_params={"max_new_tokens": 0},
                      return_logprob=True, logprob_start_len=0)
            assert out["meta_info"]["weight_version"] == "5"
            np.testing.assert_allclose([e[0] for e in out["meta_info"]["input_token_logprobs"][1:]],
                                       token_logps(hf_b, ids, 1), atol=TOL)
    finally:
        gate.set()
        srv.stop()


# --- a client that goes away aborts its own request only ----------------------------------------

def test_a_client_that_goes_away_aborts_only_its_own_request(server, http, tokenizer):
    """Two queued requests with client-chosen rids: the client of one hangs up, and only that
    one is aborted; the other, whose client still waits, runs to the end. (Two in-flight
    requests cannot share a rid: the second is refused, test_serving_edges.)"""
    engine = server.ctx.engine
    ids = tokenizer.encode("same rid")
    assert http.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            staying = pool.submit(http.post, "/generate", json={
                "input_ids": ids, "rid": "shared",
                "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}})
            deadline = time.monotonic() + 60
            while engine.stats()["waiting"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            body = {"input_ids": ids, "rid": "leaving", "stream": True,
                    "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
            with httpx.stream("POST", server.url + "/generate", json=body, timeout=60) as r:
                assert r.status_code == 200  # queued (headers sent), then the client leaves
                assert engine.stats()["waiting"] == 2
            while engine.stats()["waiting"] > 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.stats()["waiting"] == 1
            assert http.post("/continue_generation", json={}).status_code == 200
            out = staying.result(timeout=60)
        assert out.status_code == 200, out.text
        assert out.json()["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    finally:
        http.post("/continue_generation", json={})
