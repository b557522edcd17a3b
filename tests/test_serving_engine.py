"""The embedded engine's per-request robustness and sampling rules, over real HTTP on loopback:
tiny temperatures are greedy, a request whose own token fails is aborted alone (the others in
its step and the KV cache are untouched), superseded weights are freed while the engine is
idle or paused, `min_new_tokens` masks stop/EOS ids (the reported log-probs stay the raw ones),
may not exceed the (settled) `max_new_tokens` and protects its tokens from stop strings, and
malformed bodies get a 400 naming the field."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import time

import httpx
import numpy as np
import pytest

from clawjax import model as cm
from clawjax.serving import engine as engine_mod
from clawjax.serving.protocol import SamplingParams
from clawjax.serving.sampling import sample_token
from test_serving_helpers import (gen, hf_a, hf_logp, http, model_a, server,  # noqa: F401
                                  stream_chat, token_logps, tokenizer)

TOL = 1e-4


def held(server, http, bodies: list[dict]) -> list[httpx.Response]:
    """Posts `bodies` to /generate while the engine is paused in place, resumes once all are
    queued, so they are admitted (prefilled) together and decode in the same steps."""
    assert http.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    try:
        with cf.ThreadPoolExecutor(len(bodies)) as pool:
            futs = [pool.submit(http.post, "/generate", json=b) for b in bodies]
            deadline = time.monotonic() + 60
            while server.ctx.engine.stats()["waiting"] < len(bodies) and \
                    time.monotonic() < deadline:
                time.sleep(0.02)
            assert server.ctx.engine.stats()["waiting"] == len(bodies)
            assert http.post("/continue_generation", json={}).status_code == 200
            return [f.result(timeout=120) for f in futs]
    finally:
        http.post("/continue_generation", json={})


# --- tiny temperatures ------------------------------------------------------------------------

def test_sample_token_below_the_sampling_eps_is_greedy():
    logp = np.log(np.array([0.2, 0.5, 0.3], np.float32))
    for t in (1e-310, 5e-324, 1e-12, 9.9e-7):
        for seed in range(5):
            assert sample_token(logp, SamplingParams(temperature=t),
                                np.random.default_rng(seed)) == 1
    # at the eps and above it still samples (every id is reachable at temperature 1)
    seen = {sample_token(logp, SamplingParams(temperature=1.0), np.random.default_rng(s))
            for s in range(200)}
    assert seen == {0, 1, 2}


def test_tiny_temperature_request_is_greedy_and_harms_no_other_request(server, http, tokenizer):
    prompt = tokenizer.encode("Tiny temperature")
    errors = server.ctx.engine.stats().get("engine_errors", 0)
    greedy = gen(http, input_ids=prompt, sampling_params={"max_new_tokens": 8,
                                                          "temperature": 0})["output_ids"]
    innocent = {"input_ids": tokenizer.encode("innocent"),
                "sampling_params": {"max_new_tokens": 12, "ignore_eos": True}}
    tiny = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 8,
                                                     "temperature": 1e-310}}
    r_innocent, r_tiny = held(server, http, [innocent, tiny])
    assert r_tiny.status_code == 200, r_tiny.text
    assert r_tiny.json()["output_ids"] == greedy
    assert r_innocent.status_code == 200, r_innocent.text
    assert len(r_innocent.json()["output_ids"]) == 12
    assert server.ctx.engine.stats().get("engine_errors", 0) == errors


# --- a failing request is aborted alone -------------------------------------------------------

def test_a_request_whose_token_fails_is_aborted_alone(server, http, hf_a, tokenizer,
                                                      monkeypatch):
    """Three requests share a prefill and then decode steps; sampling one fails at its first
    token (the prefill loop), another at its second (the decode loop). Each is aborted with
    the error; the third runs to the end with log-probs equal to HF's (the cache is intact)."""
    real, calls = engine_mod.sample_token, collections.Counter()

    def flaky(logp, params, rng, *args, **kwargs):
        seed = params.sampling_seed
        calls[seed] += 1
        if (seed, calls[seed]) in ((4241, 1), (4242, 2)):
            raise RuntimeError(f"sampler exploded for seed {seed}")
        return real(logp, params, rng, *args, **kwargs)

    monkeypatch.setattr(engine_mod, "sample_token", flaky)
    before = server.ctx.engine.stats()
    prompt = tokenizer.encode("The innocent one")
    innocent = {"input_ids": prompt, "return_logprob": True,
                "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}}
    bad = [{"input_ids": tokenizer.encode(f"bad {s}"),
            "sampling_params": {"max_new_tokens": 16, "sampling_seed": s, "ignore_eos": True}}
           for s in (4241, 4242)]
    r_innocent, r_pre, r_dec = held(server, http, [innocent] + bad)
    for r, seed, n in ((r_pre, 4241, 0), (r_dec, 4242, 1)):
        assert r.status_code == 200, r.text  # the server is fine: no 5xx (fleets mark down)
        out = r.json()
        finish = out["meta_info"]["finish_reason"]
        assert finish["type"] == "abort" and f"sampler exploded for seed {seed}" in \
            finish["message"] and "RuntimeError" in finish["message"]
        assert len(out["output_ids"]) == n
    assert r_innocent.status_code == 200, r_innocent.text
    out = r_innocent.json()
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 16}
    np.testing.assert_allclose([e[0] for e in out["meta_info"]["output_token_logprobs"]],
                               token_logps(hf_a, prompt + out["output_ids"], len(prompt)),
                               atol=TOL)
    after = server.ctx.engine.stats()
    assert after.get("request_errors", 0) == before.get("request_errors", 0) + 2
    assert after.get("engine_errors", 0) == before.get("engine_errors", 0)
    assert after["running"] == 0


# --- weight versions --------------------------------------------------------------------------

def test_superseded_weight_versions_are_freed_while_idle_or_paused():
    """Updates with no traffic (engine idle, or paused) keep only the current parameters: a
    swap drops every version no request runs on, at once (no step has to run first)."""
    config = cm.ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, qk_norm=True,
                            max_position_embeddings=64)
    eng = engine_mod.Engine(cm.init_random(config, seed=0), config, max_batch=2,
                            context_len=32)
    try:
        for v in ("1", "2", "3"):
            eng.load_weights(cm.init_random(config, seed=int(v)), config, v)
            assert eng.stats()["versions_alive"] == [v]
        eng.pause()
        for v in ("4", "5"):
            eng.load_weights(cm.init_random(config, seed=int(v)), config, v)
            assert eng.stats()["versions_alive"] == [v]
        assert eng.stats()["weight_swaps"] == 5
    finally:
        eng.close()


# --- min_new_tokens ---------------------------------------------------------------------------

def test_min_new_tokens_masks_stop_token_ids_and_reports_raw_logprobs(http, hf_a, tokenizer):
    prompt = tokenizer.encode("Masked until")
    x = gen(http, input_ids=prompt, sampling_params={"max_new_tokens": 1,
                                                     "temperature": 0})["output_ids"][0]
    out = gen(http, input_ids=prompt, return_logprob=True, sampling_params={
        "max_new_tokens": 6, "temperature": 0, "min_new_tokens": 4, "stop_token_ids": [x],
        "ignore_eos": True})
    ids = out["output_ids"]
    assert x not in ids[:4] and len(ids) >= 4
    if x in ids:  # once allowed, the stop token stops (and is kept)
        assert ids.index(x) == len(ids) - 1
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": x}
    # greedy under the mask: the argmax of the raw row with x removed; log-probs are raw
    lp = hf_logp(hf_a, prompt + ids)
    for t, tok in enumerate(ids[:4]):
        row = lp[len(prompt) + t - 1].copy()
        row[x] = -np.inf
        assert row[tok] >= row.max() - 1e-5
    np.testing.assert_allclose([e[0] for e in out["meta_info"]["output_token_logprobs"]],
                               token_logps(hf_a, prompt + ids, len(prompt)), atol=TOL)


def test_min_new_tokens_masks_eos_unless_ignore_eos(server, http, tokenizer, monkeypatch):
    prompt = tokenizer.encode("Masked until")
    x = gen(http, input_ids=prompt, sampling_params={"max_new_tokens": 1,
                                                     "temperature": 0})["output_ids"][0]
    monkeypatch.setattr(server.ctx.engine, "eos_ids", frozenset({x}))  # x is now an EOS id
    sp = {"max_new_tokens": 5, "temperature": 0, "min_new_tokens": 3}
    ids = gen(http, input_ids=prompt, sampling_params=sp)["output_ids"]
    assert x not in ids[:3] and len(ids) >= 3
    # ignore_eos: EOS ids are ordinary tokens, not masked (and do not stop)
    ids = gen(http, input_ids=prompt, sampling_params={**sp, "ignore_eos": True})["output_ids"]
    assert ids[0] == x and len(ids) == 5


MIN_CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,body,field,says", [
    # set explicitly: SGLang's "min_new_tokens must be in [0, max_new_tokens]"
    ("/generate", {"input_ids": [1, 2, 3],
                   "sampling_params": {"max_new_tokens": 2, "min_new_tokens": 5}},
     "sampling_params.min_new_tokens", ["[0, 2]", "'sampling_params.max_new_tokens' = 2"]),
    ("/v1/chat/completions", {"messages": MIN_CHAT, "max_tokens": 2, "min_tokens": 5},
     "min_tokens", ["[0, 2]", "'max_tokens' = 2"]),
    ("/v1/chat/completions", {"messages": MIN_CHAT, "max_tokens": 9,
                              "max_completion_tokens": 3, "min_tokens": 4},
     "min_tokens", ["[0, 3]", "'max_completion_tokens' = 3"]),
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 1, "min_tokens": 2},
     "min_tokens", ["[0, 1]", "'max_tokens' = 1"]),
    # left to the default, settled once the prompt is known
    ("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"min_new_tokens": 200}},
     "sampling_params.min_new_tokens", ["[0, 128]", "not set", "128"]),
    ("/generate", {"input_ids": [1, 2, 3],
                   "sampling_params": {"max_new_tokens": None, "min_new_tokens": 254}},
     "sampling_params.min_new_tokens", ["[0, 253]", "context length 256", "3 prompt tokens"]),
    ("/v1/completions", {"prompt": [1, 2, 3], "min_tokens": 17},
     "min_tokens", ["[0, 16]", "'max_tokens'", "not set"]),
    ("/v1/chat/completions", {"messages": MIN_CHAT, "min_tokens": 300},
     "min_tokens", ["'max_tokens'", "not set", "context length 256"]),
])
def test_min_new_tokens_above_max_new_tokens_is_refused(http, path, body, field, says):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["param"] == field and repr(field) in err["message"], err
    for s in says:
        assert s in err["message"], (s, err["message"])


def test_min_new_tokens_up_to_max_new_tokens_is_accepted(http):
    out = gen(http, input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 3,
                                                          "min_new_tokens": 3})
    assert len(out["output_ids"]) == 3
    r = http.post("/v1/chat/completions", json={"messages": MIN_CHAT, "min_tokens": 2,
                                                "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def stop_after_min(texts: list[str], stop: str, m: int) -> tuple[str, int]:
    """The reference: (text, completion tokens) of a greedy answer whose prefix texts are
    `texts` (`texts[k]`: the first k tokens) under stop string `stop` and min_new_tokens `m`:
    the first occurrence that ends past the text of the first `m` tokens ends it, trimmed."""
    for k in range(m + 1, len(texts)):
        at = texts[k].find(stop, max(0, len(texts[m]) - len(stop) + 1))
        if at >= 0:
            return texts[k][:at], k
    return texts[-1], len(texts) - 1


def test_a_stop_string_inside_the_first_min_new_tokens_is_ignored(http, tokenizer):
    """Only a stop string that ends after the first `min_new_tokens` tokens ends generation
    (SGLang checks the recent tail); one lying wholly inside them is ignored, not found later
    and cut at (which would cut text already streamed). A streamed chat adds up to the final
    content, and `completion_tokens` counts the tokens up to the match."""
    body = {"messages": MIN_CHAT, "temperature": 0, "ignore_eos": True, "max_tokens": 16}
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        MIN_CHAT, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    ids = gen(http, input_ids=prompt, sampling_params={
        "max_new_tokens": 16, "temperature": 0, "ignore_eos": True})["output_ids"]
    texts = [tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
    full = texts[-1]
    # a stop first produced at token i, inside the first i + 3 (ignored there), and one that
    # starts inside the first m tokens and ends after them (it ends generation)
    i = next(i for i in range(1, 6) if full[i] not in full[:i])
    m = next(m for m in range(2, 8) if full.find(full[m - 1:m + 1]) == m - 1)
    for stop, min_tokens in ((full[i], i + 3), (full[m - 1:m + 1], m)):
        text, n = stop_after_min(texts, stop, min_tokens)
        out = gen(http, input_ids=prompt, sampling_params={
            "max_new_tokens": 16, "temperature": 0, "ignore_eos": True, "stop": [stop],
            "min_new_tokens": min_tokens})
        assert (out["text"], out["meta_info"]["completion_tokens"]) == (text, n), (stop, full)
        assert len(out["text"]) >= len(texts[min_tokens]) - len(stop) + 1
        req = {**body, "stop": [stop], "min_tokens": min_tokens}
        whole = http.post("/v1/chat/completions", json=req).json()
        assert whole["choices"][0]["message"]["content"] == text
        assert whole["usage"]["completion_tokens"] == n
        assert whole["choices"][0]["finish_reason"] == ("stop" if n < 16 else "length")
        chunks = stream_chat(http, req)
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c["choices"]) == text, (stop, min_tokens, full)


def test_sample_token_banned_ids_fall_back_to_the_raw_row_when_nothing_is_left():
    logp = np.log(np.array([0.2, 0.5, 0.3], np.float32))
    greedy = SamplingParams(temperature=0.0)
    rng = np.random.default_rng(0)
    assert sample_token(logp, greedy, rng, banned=[1]) == 2
    assert sample_token(logp, greedy, rng, banned=[0, 1, 2]) == 1
    for s in range(50):
        assert sample_token(logp, SamplingParams(), np.random.default_rng(s),
                            banned=[0, 2]) == 1


# --- malformed bodies: 400 naming the field, before anything is streamed -----------------------

CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,raw,field,says", [
    ("/generate", b'{"input_ids": {"a": 1}}', "input_ids", "a list of token ids"),
    ("/generate", b'{"input_ids": 5}', "input_ids", "a list of token ids"),
    ("/generate", b'{"input_ids": "12"}', "input_ids", "a list of token ids"),
    ("/generate", b'\xff\xfe\x00', "body", "valid JSON"),
    ("/generate", b'{"input_ids": [1, 2], "x": "\xff"}', "body", "valid JSON"),
    ("/v1/chat/completions", json.dumps({"messages": CHAT, "max_tokens": 2, "stream": True,
                                         "stream_options": "yes"}).encode(),
     "stream_options", "an object"),
    ("/v1/chat/completions", json.dumps({"messages": CHAT, "max_tokens": 2,
                                         "stream_options": [1]}).encode(),
     "stream_options", "an object"),
    ("/v1/chat/completions", json.dumps({"messages": CHAT, "max_tokens": 2, "stream": True,
                                         "stream_options": {"include_usage": "yes"}}).encode(),
     "stream_options.include_usage", "true or false"),
    ("/v1/chat/completions", json.dumps({"messages": CHAT, "max_tokens": 2, "rid": 5}).encode(),
     "rid", "a string"),
    ("/generate", b'{"input_ids": [1, 2], "rid": 5}', "rid", "a string"),
])
def test_malformed_bodies_get_400_naming_the_field(http, path, raw, field, says):
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["param"] == field and repr(field) in err["message"] and says in err["message"]
    assert gen(http, input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 1})["output_ids"]


def test_streamed_chat_with_include_usage_still_works(http):
    body = {"messages": CHAT, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks = []
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunks.append(json.loads(line[5:]))
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
