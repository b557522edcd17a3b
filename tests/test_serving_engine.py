"""The embedded engine's per-request robustness and sampling rules, over real HTTP on loopback:
tiny temperatures are greedy, a request whose own token fails is aborted alone (the others in
its step and the KV cache are untouched), `min_new_tokens` masks stop/EOS ids (the reported
log-probs stay the raw ones), and malformed bodies get a 400 naming the field."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import time

import httpx
import numpy as np
import pytest

from clawjax.serving import engine as engine_mod
from clawjax.serving.protocol import SamplingParams
from clawjax.serving.sampling import sample_token
from test_serving_helpers import (gen, hf_a, hf_logp, http, model_a, server,  # noqa: F401
                                  token_logps, tokenizer)

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
