"""The embedded JAX server over real HTTP on loopback: /generate (log-probs, scoring, top-k,
stop conditions), chat completions with the template, concurrency, bad requests, and weight
updates — log-probs checked against HF torch (float64 log-softmax of the float32 logits)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import httpx
import numpy as np
import pytest

from clawjax.serving.launch import ServerThread, make_context
from test_serving_helpers import (gen, hf_a, hf_b, http, make_model_dir, model_a,  # noqa: F401
                                  model_b, server, stream_chat, token_logps, tokenizer)

TOL = 1e-4


def test_generate_greedy_with_and_without_logprobs(http, hf_a, tokenizer):
    prompt = tokenizer.encode("The cat sat")
    plain = gen(http, input_ids=prompt, sampling_params={"max_new_tokens": 12, "temperature": 0})
    assert len(plain["output_ids"]) == 12
    assert "output_token_logprobs" not in plain["meta_info"]
    meta = plain["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 12}
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (len(prompt), 12)
    assert meta["weight_version"] == "default" and meta["id"]
    assert plain["text"] == tokenizer.decode(plain["output_ids"], skip_special_tokens=True)

    out = gen(http, input_ids=prompt, sampling_params={"max_new_tokens": 12, "temperature": 0},
              return_logprob=True)
    assert out["output_ids"] == plain["output_ids"]  # greedy is deterministic
    ids = prompt + out["output_ids"]
    got = [e[0] for e in out["meta_info"]["output_token_logprobs"]]
    assert [e[1] for e in out["meta_info"]["output_token_logprobs"]] == out["output_ids"]
    np.testing.assert_allclose(got, token_logps(hf_a, ids, len(prompt)), atol=TOL)
    # logprob_start_len = -1: only the last prompt token, with a None log-prob (SGLang).
    assert out["meta_info"]["input_token_logprobs"] == [[None, prompt[-1], None]]
    # greedy picks the argmax of the reference distribution (up to float ties)
    from test_serving_helpers import hf_logp
    lp = hf_logp(hf_a, ids)
    for t in range(len(prompt), len(ids)):
        assert lp[t - 1, ids[t]] >= lp[t - 1].max() - 1e-5


def test_logprob_start_len_scoring_matches_hf(http, hf_a, tokenizer):
    prompt = tokenizer.encode("Hello there, ")
    response = tokenizer.encode("general Kenobi")
    ids = prompt + response
    for start in (0, len(prompt) - 1, len(prompt)):
        out = gen(http, input_ids=ids, sampling_params={"max_new_tokens": 0},
                  return_logprob=True, logprob_start_len=start)
        meta = out["meta_info"]
        assert out["output_ids"] == [] and meta["finish_reason"]["type"] == "length"
        entries = meta["input_token_logprobs"]
        assert len(entries) == len(ids) - start
        assert entries[0][0] is None and entries[0][1] == ids[start]  # the entry AT start
        assert [e[1] for e in entries] == ids[start:]
        np.testing.assert_allclose([e[0] for e in entries[1:]],
                                   token_logps(hf_a, ids, start + 1), atol=TOL)


def test_top_logprobs_num(http, hf_a, tokenizer):
    prompt = tokenizer.encode("abc")
    out = gen(http, input_ids=prompt, sampling_params={"max_new_tokens": 4, "temperature": 0},
              return_logprob=True, logprob_start_len=0, top_logprobs_num=3,
              return_text_in_logprobs=True)
    meta = out["meta_info"]
    ids = prompt + out["output_ids"]
    from test_serving_helpers import hf_logp
    lp = hf_logp(hf_a, ids)
    assert meta["input_top_logprobs"][0] is None
    assert len(meta["input_top_logprobs"]) == len(prompt)
    assert len(meta["output_top_logprobs"]) == 4
    tops = meta["input_top_logprobs"][1:] + meta["output_top_logprobs"]
    for t, top in zip(range(1, len(ids)), tops):
        assert len(top) == 3
        ref = np.sort(lp[t - 1])[::-1][:3]
        np.testing.assert_allclose([e[0] for e in top], ref, atol=TOL)
        for v, tok, text in top:
            assert abs(lp[t - 1, tok] - v) < TOL and text == tokenizer.decode([tok])
    assert meta["output_token_logprobs"][0][2] == tokenizer.decode([out["output_ids"][0]])


def test_stop_conditions(http, tokenizer):
    prompt = tokenizer.encode("Once upon")
    base = gen(http, input_ids=prompt, sampling_params={"max_new_tokens": 10, "temperature": 0})
    ids = base["output_ids"]
    # stop_token_ids: finishes AT the first occurrence, the stop token is kept in output_ids
    first = ids.index(ids[3])
    out = gen(http, input_ids=prompt, sampling_params={"max_new_tokens": 10, "temperature": 0,
                                                       "stop_token_ids": [ids[3]]})
    assert out["output_ids"] == ids[:first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[3]}
    # stop strings: text trimmed before the match (unless no_stop_trim)
    text = base["text"]
    stop = text[4:6] if len(text) >= 6 else text[-1]
    out = gen(http, input_ids=prompt, sampling_params={"max_new_tokens": 10, "temperature": 0,
                                                       "stop": [stop]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[:text.index(stop)]
    out = gen(http, input_ids=prompt, sampling_params={"max_new_tokens": 10, "temperature": 0,
                                                       "stop": stop, "no_stop_trim": True})
    assert out["text"].endswith(stop)
    # eos: the tokenizer's eos stops generation unless ignore_eos
    eos = tokenizer.eos_token_id
    out = gen(http, input_ids=prompt, sampling_params={
        "max_new_tokens": 10, "temperature": 0, "stop_token_ids": [eos], "ignore_eos": True})
    assert eos not in out["output_ids"] or out["output_ids"][-1] == eos


def test_seeded_sampling_is_reproducible(http, tokenizer):
    prompt = tokenizer.encode("xyz")
    sp = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.9, "top_k": 20,
          "sampling_seed": 7}
    a = gen(http, input_ids=prompt, sampling_params=sp)
    b = gen(http, input_ids=prompt, sampling_params=sp)
    assert a["output_ids"] == b["output_ids"]


def test_chat_completions_uses_the_template(http, hf_a, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    expected = tokenizer.encode(tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    body = {"model": "m", "messages": messages, "max_tokens": 6, "temperature": 0,
            "logprobs": True}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["prompt_tokens"] == len(expected)
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("length", "stop")
    assert out["metadata"]["weight_version"] == "default"
    # the same prompt through /generate gives the same greedy answer
    ref = gen(http, input_ids=expected, sampling_params={"max_new_tokens": 6, "temperature": 0},
              return_logprob=True)
    assert choice["message"]["content"] == ref["text"]
    np.testing.assert_allclose([c["logprob"] for c in choice["logprobs"]["content"]],
                               [e[0] for e in ref["meta_info"]["output_token_logprobs"]],
                               atol=1e-6)
    # streaming: the deltas add up to the same content, the last chunk has finish_reason
    chunks = stream_chat(http, body)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_generate_stream(http, tokenizer):
    body = {"input_ids": tokenizer.encode("abc"),
            "sampling_params": {"max_new_tokens": 5, "temperature": 0}, "stream": True}
    events = []
    with http.stream("POST", "/generate", json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                events.append(json.loads(line[5:]))
    ref = gen(http, input_ids=body["input_ids"], sampling_params=body["sampling_params"])
    assert events[-1]["output_ids"] == ref["output_ids"]
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert len(events) == 5


def test_16_concurrent_requests_share_batches(http, server, hf_a, tokenizer):
    prompts = [tokenizer.encode(f"request {i}: " + "ab" * (i % 5)) for i in range(16)]

    def one(i):
        return gen(http, input_ids=prompts[i], return_logprob=True,
                   sampling_params={"max_new_tokens": 6 + i % 4, "temperature": 0,
                                    "ignore_eos": True})

    before = server.ctx.engine.stats()
    with cf.ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(one, range(16)))
    after = server.ctx.engine.stats()
    decode_steps = after["decode_steps"] - before["decode_steps"]
    total_tokens = sum(len(o["output_ids"]) for o in outs)
    assert decode_steps < total_tokens  # several sequences per forward
    for i, out in enumerate(outs):
        assert len(out["output_ids"]) == 6 + i % 4
        ids = prompts[i] + out["output_ids"]
        np.testing.assert_allclose([e[0] for e in out["meta_info"]["output_token_logprobs"]],
                                   token_logps(hf_a, ids, len(prompts[i])), atol=TOL)


@pytest.mark.parametrize("body,field", [
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}},
     "sampling_params.max_new_tokens"),
    ({"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}},
     "sampling_params.temperature"),
    ({"input_ids": [1, 2], "sampling_params": {"top_k": 0}}, "sampling_params.top_k"),
    ({"input_ids": [1, 2], "sampling_params": {"top_p": 1.5}}, "sampling_params.top_p"),
    ({"input_ids": [1, 2], "sampling_params": {"json_schema": "{}"}},
     "sampling_params.json_schema"),
    ({"input_ids": [1, 99999]}, "input_ids[1]"),
    ({"input_ids": [1] * 300}, "input_ids"),
    ({"input_ids": [1] * 200, "sampling_params": {"max_new_tokens": 100}},
     "sampling_params.max_new_tokens"),
    ({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 5}, "logprob_start_len"),
    ({"input_ids": [1, 2], "top_logprobs_num": -2}, "top_logprobs_num"),
    ({"input_ids": [1, 2], "frobnicate": 3}, "frobnicate"),
    ({"text": "a", "input_ids": [1]}, "input_ids"),
    ({"sampling_params": {}}, "input_ids"),
])
def test_bad_generate_requests_get_400_naming_the_field(http, body, field):
    r = http.post("/generate", json=body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["param"] == field and repr(field) in err["message"]
    assert gen(http, input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 1})["output_ids"]


def test_bad_chat_and_malformed_json(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["param"] == "messages[0].role"
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                "max_tokens": 10_000})
    assert r.status_code == 400 and r.json()["param"] == "max_tokens"
    r = http.post("/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["param"] == "body"
    assert http.get("/health").status_code == 200


def test_info_endpoints(http, model_a):
    info = http.get("/get_model_info").json()
    assert info["model_path"] == str(model_a) and info["is_generation"] is True
    assert info["weight_version"] == "default"
    server_info = http.get("/get_server_info").json()
    assert server_info["context_length"] == 256
    assert server_info["platform"] == "cpu"  # the test server runs with JAX_PLATFORMS=cpu
    assert http.post("/flush_cache").status_code == 200
    assert http.get("/health_generate").status_code == 200
    assert http.get("/v1/models").json()["data"][0]["id"] == str(model_a)


def test_pause_and_continue_generation(http, tokenizer):
    assert http.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(gen, http, input_ids=tokenizer.encode("p"),
                          sampling_params={"max_new_tokens": 2})
        with pytest.raises(cf.TimeoutError):
            fut.result(timeout=1.0)  # held while paused
        assert http.post("/continue_generation", json={}).status_code == 200
        assert len(fut.result(timeout=60)["output_ids"]) == 2
    assert http.post("/pause_generation", json={"mode": "sideways"}).status_code == 400


def test_update_weights_from_disk_parity_before_and_after(model_a, model_b, hf_a, hf_b,
                                                          tokenizer):
    srv = ServerThread(make_context(str(model_a), max_batch=4, context_len=256)).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            ids = tokenizer.encode("Weights, before and after.")

            def score():
                out = gen(http, input_ids=ids, sampling_params={"max_new_tokens": 0},
                          return_logprob=True, logprob_start_len=0)
                return out["meta_info"]["weight_version"], \
                    [e[0] for e in out["meta_info"]["input_token_logprobs"][1:]]

            version, lp = score()
            assert version == "default"
            np.testing.assert_allclose(lp, token_logps(hf_a, ids, 1), atol=TOL)
            # a generation in flight while the weights change finishes on the old ones: it is
            # admitted, held (pause in_place), the weights swap, then it resumes.
            started = threading.Event()

            def stream_long():
                body = {"input_ids": ids, "return_logprob": True, "stream": True,
                        "sampling_params": {"max_new_tokens": 200, "temperature": 0,
                                            "ignore_eos": True}}
                last = None
                with httpx.stream("POST", srv.url + "/generate", json=body, timeout=120) as r:
                    for line in r.iter_lines():
                        if line.startswith("data:") and line[5:].strip() != "[DONE]":
                            last = json.loads(line[5:])
                            started.set()
                return last

            with cf.ThreadPoolExecutor(1) as pool:
                long = pool.submit(stream_long)
                assert started.wait(60)
                assert http.post("/pause_generation", json={"mode": "in_place"}).status_code \
                    == 200
                r = http.post("/update_weights_from_disk",
                              json={"model_path": str(model_b), "weight_version": "7"})
                assert r.status_code == 200 and r.json()["success"] is True
                info = http.get("/get_server_info").json()
                assert info["running"] == 1 and info["versions_alive"] == ["7", "default"]
                assert http.post("/continue_generation", json={}).status_code == 200
                old = long.result(timeout=120)
            assert old["meta_info"]["weight_version"] == "default"
            assert len(old["output_ids"]) == 200
            np.testing.assert_allclose(
                [e[0] for e in old["meta_info"]["output_token_logprobs"]],
                token_logps(hf_a, ids + old["output_ids"], len(ids)), atol=TOL)
            assert http.get("/get_server_info").json()["versions_alive"] == ["7"]
            version, lp = score()
            assert version == "7"
            np.testing.assert_allclose(lp, token_logps(hf_b, ids, 1), atol=TOL)
            assert http.get("/get_model_info").json()["weight_version"] == "7"
            # a bad path: 400 with success false, the server keeps the current weights
            r = http.post("/update_weights_from_disk",
                          json={"model_path": str(model_b) + "-missing", "weight_version": "8"})
            assert r.status_code == 400 and r.json()["success"] is False
            assert score()[0] == "7"
    finally:
        srv.stop()


def test_directory_without_tokenizer_and_api_key(tmp_path, hf_a):
    path = make_model_dir(tmp_path / "bare", seed=0, tokenizer=False)
    srv = ServerThread(make_context(str(path), max_batch=2, context_len=64,
                                    api_key="sekret")).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            assert http.get("/health").status_code == 200  # probes need no key
            body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3}}
            assert http.post("/generate", json=body).status_code == 401
            auth = {"Authorization": "Bearer sekret"}
            r = http.post("/generate", json=body, headers=auth)
            assert r.status_code == 200 and len(r.json()["output_ids"]) == 3
            r = http.post("/generate", json={"text": "hi"}, headers=auth)
            assert r.status_code == 400 and r.json()["param"] == "text"
            r = http.post("/v1/chat/completions", headers=auth,
                          json={"messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 400 and r.json()["param"] == "messages"
    finally:
        srv.stop()


def test_client_that_goes_away_frees_its_slot(server, tokenizer, monkeypatch):
    """A streaming client reads one token and hangs up; the disconnect must abort the request
    and free its slot. Decode steps wait at a gate the test opens only once the server has
    called `abort`, so the request can neither finish its 253 tokens first nor be reaped
    before the client has read its token, however loaded the machine. (Two earlier versions
    raced: pausing from the client let the engine finish first, and pausing from the engine
    thread could land after the test's resume. The line iterator is kept alive because
    dropping it closes the connection at once.)"""
    engine = server.ctx.engine
    before = engine.stats().get("finished_abort", 0)
    gate, aborted = threading.Event(), threading.Event()
    decode, abort = engine._run_decode, engine.abort

    def gated_decode(reqs):
        gate.wait(60)
        decode(reqs)

    def observed_abort(*args, **kwargs):
        n = abort(*args, **kwargs)
        aborted.set()
        return n

    monkeypatch.setattr(engine, "_run_decode", gated_decode)
    monkeypatch.setattr(engine, "abort", observed_abort)
    prompt = tokenizer.encode("bye")
    body = {"input_ids": prompt, "stream": True,
            "sampling_params": {"max_new_tokens": 256 - len(prompt), "ignore_eos": True}}
    try:
        with httpx.stream("POST", server.url + "/generate", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[len("data: "):])["meta_info"]["finish_reason"] is None
            assert engine.stats()["running"] == 1 and not aborted.is_set()
        assert aborted.wait(30), "the server did not abort the request of a client that left"
        gate.set()
        deadline = time.monotonic() + 30
        while engine.stats().get("finished_abort", 0) == before and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = engine.stats()
    finally:
        gate.set()
    assert stats.get("finished_abort", 0) == before + 1 and stats["running"] == 0
