"""Edge cases of the embedded server and the fleet, over real HTTP on loopback: a client `rid`
that is already in flight is refused (SGLang: "Duplicate request ID"), so `/abort_request`
cannot hit the wrong request; chat `top_logprobs` without `logprobs` is a 400 (OpenAI); a
weight load that outlives its client is not overtaken by a later one; a fleet update slower
than `update_timeout` on a healthy server leaves it up, is sent once and is recorded when it
lands; a byte-level tokenizer whose tokens split UTF-8 characters streams no U+FFFD; and
hostile input (a lone surrogate in a text prompt, a deeply nested body, stop lists past their
bounds) is a 400 naming the field, never a 500 (which a fleet reads as a dead server)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import threading
import time

import httpx
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import hf_tiny
from clawjax.serving import fields
from clawjax.serving.fleet import Fleet
from clawjax.serving.launch import ServerThread, make_context
from clawjax.tokenizer import CHAT_TEMPLATE, IM_END, IM_START, PAD_TOKEN, save_tokenizer

from test_serving_helpers import (Scripted, gen, http, model_a, model_b,  # noqa: F401
                                  server, tokenizer)

CHAT = [{"role": "user", "content": "Hi!"}]


def wait_for(cond, what: str, timeout: float = 60.0) -> None:
    """Polls `cond()` until true; fails the test naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


# --- 1. duplicate rid ----------------------------------------------------------------------
def test_a_second_request_with_an_in_flight_rid_is_refused(http, tokenizer):
    body = {"input_ids": tokenizer.encode("dup"), "rid": "same-rid",
            "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}
    answers: dict[str, httpx.Response] = {}

    def post(name):
        answers[name] = http.post("/generate", json=body)

    assert http.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    try:
        first = threading.Thread(target=post, args=("first",))
        first.start()  # waits in the queue while generation is paused
        wait_for(lambda: http.get("/get_server_info").json()["waiting"] == 1, "the first")
        second = threading.Thread(target=post, args=("second",))
        second.start()
        second.join(5)  # refused at once; else it waits in the queue like the first
        r = http.post("/abort_request", json={"rid": "same-rid"})
        assert r.status_code == 200 and r.json()["num_aborted_requests"] >= 1
    finally:
        http.post("/continue_generation", json={})
    first.join(60), second.join(60)
    assert answers["second"].status_code == 400, answers["second"].text
    err = answers["second"].json()
    assert err["param"] == "rid" and "same-rid" in err["message"]
    assert answers["first"].json()["meta_info"]["finish_reason"]["type"] == "abort"
    # once the first is over the rid is free again
    out = gen(http, **body)
    assert out["meta_info"]["id"] == "same-rid"
    assert out["meta_info"]["finish_reason"]["type"] == "length"


# --- 2. top_logprobs needs logprobs ---------------------------------------------------------
@pytest.mark.parametrize("extra", [{}, {"logprobs": False}])
def test_chat_top_logprobs_without_logprobs_is_refused(http, extra):
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2,
                                                "top_logprobs": 3, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["param"] == "top_logprobs" and "logprobs" in r.json()["message"]
    ok = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2,
                                                 "top_logprobs": 0, **extra})
    assert ok.status_code == 200, ok.text


# --- 3. slow weight loads -----------------------------------------------------------------
def test_an_update_whose_client_left_is_not_overtaken_by_a_later_one(model_a, model_b):
    """The client of a slow load times out and goes away; a later update to other weights
    must apply after it (in order), so the server ends on the later one's weights."""
    ctx = make_context(str(model_a), max_batch=4, context_len=256)
    load, started = ctx.load_model, threading.Event()

    def slow_load(path):
        if path == str(model_b):
            started.set()
            time.sleep(1.5)
        return load(path)

    ctx.load_model = slow_load
    with ServerThread(ctx) as srv:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/update_weights_from_disk", timeout=0.5,
                       json={"model_path": str(model_b), "weight_version": "2"})
        assert started.wait(30)
        r = httpx.post(srv.url + "/update_weights_from_disk", timeout=120,
                       json={"model_path": str(model_a), "weight_version": "3"})
        assert r.status_code == 200 and r.json()["success"], r.text
        wait_for(lambda: ctx.engine.counters["weight_swaps"] >= 2, "both swaps")
        time.sleep(0.2)  # nothing else is pending; a late swap would show up here
        info = httpx.get(srv.url + "/get_model_info", timeout=30).json()
        assert info["weight_version"] == "3" and info["model_path"] == str(model_a)
        assert ctx.engine.counters["weight_swaps"] == 2


def test_fleet_update_slower_than_update_timeout_keeps_a_healthy_server_up():
    """A load longer than `update_timeout` on a server that answers /health: it stays up on
    its current weights, the update is not sent again while it loads, and the fleet records
    the new weights once the load ends."""
    async def main():
        a = await Scripted("a").start()
        a.update_delay = 1.0
        async with Fleet([a.url], probe_interval=0.02, update_timeout=0.3,
                         update_retry_interval=0.05, health_timeout=0.5) as fleet:
            res = await fleet.update_weights_from_disk("/ckpt/v2", "2")
            assert not res[a.url]["success"] and "loading" in res[a.url]["message"]
            assert fleet.servers[0].up  # healthy, still loading: not marked down
            assert (await fleet.generate(input_ids=[1]))["meta_info"]["weight_version"] \
                == "default"
            deadline = time.monotonic() + 10
            while fleet.servers[0].weight_version != "2" and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert fleet.servers[0].weight_version == "2" and fleet.servers[0].up
            assert not fleet.stats()["per_server"][0]["stale"]
            await asyncio.sleep(0.3)  # fifteen probes: the fleet is current, nothing re-sent
            assert a.updates == [("/ckpt/v2", "2")]
            assert fleet.servers[0].failures == 0
        await a.stop()
    asyncio.run(main())


# --- 4. partial UTF-8 through the real server --------------------------------------------
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges: one token per UTF-8 byte (ids 0..255 in
    GPT-2's byte-to-unicode order), then the ChatML specials. Every character outside ASCII
    spans several tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    vocab = {mapping[b]: b for b in range(256)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in (PAD_TOKEN, IM_START, IM_END)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=PAD_TOKEN,
                                  pad_token=PAD_TOKEN, additional_special_tokens=[IM_START,
                                                                                  IM_END],
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def byte_server(tmp_path_factory):
    tok = byte_level_tokenizer()
    assert len(tok.encode("é")) == 2 and tok.decode(tok.encode("é€")) == "é€"
    path = tmp_path_factory.mktemp("byte_model")
    hf_tiny.save(hf_tiny.build("qwen3", seed=3, vocab_size=len(tok),
                               eos_token_id=tok.eos_token_id, max_position_embeddings=512), path)
    save_tokenizer(tok, str(path))
    with ServerThread(make_context(str(path), max_batch=4, context_len=256)) as srv:
        yield srv


def sse(client: httpx.Client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        return [json.loads(line[5:]) for line in resp.iter_lines()
                if line.startswith("data:") and line[5:].strip() != "[DONE]"]


def multibyte_seed(client: httpx.Client, body: dict) -> tuple[int, str]:
    """A sampling seed whose (non-streamed) chat answer holds a character of several bytes,
    and that answer."""
    for seed in range(40):
        r = client.post("/v1/chat/completions", json={**body, "seed": seed})
        content = r.json()["choices"][0]["message"]["content"]
        if any(ord(c) > 0x7F and c != "\ufffd" for c in content):
            return seed, content
    raise AssertionError("no seed gave a multi-byte character")


def test_streams_never_send_half_a_utf8_character(byte_server):
    body = {"messages": CHAT, "max_tokens": 48, "temperature": 1.0, "ignore_eos": True}
    with httpx.Client(base_url=byte_server.url, timeout=120) as client:
        seed, full = multibyte_seed(client, body)
        chunks = sse(client, "/v1/chat/completions", {**body, "seed": seed})
        deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
        assert "".join(deltas) == full
        assert all("\ufffd" not in d for d in deltas[:-1] if "\ufffd" not in full)
        # the same through /v1/completions and /generate (whose partial texts are prefixes
        # of the final one: SGLang holds an incomplete character back too)
        prompt = [5, 6, 7]
        comp = {"prompt": prompt, "max_tokens": 48, "seed": seed, "ignore_eos": True}
        whole = client.post("/v1/completions", json=comp).json()["choices"][0]["text"]
        parts = [c["choices"][0]["text"] for c in sse(client, "/v1/completions", comp)
                 if c["choices"]]
        assert "".join(parts) == whole
        events = sse(client, "/generate", {"input_ids": prompt, "sampling_params": {
            "max_new_tokens": 48, "sampling_seed": seed, "ignore_eos": True}})
        final = events[-1]["text"]
        for e in events[:-1]:
            assert final.startswith(e["text"]), (e["text"], final)


def test_a_stop_string_ending_in_a_multibyte_character_is_never_streamed(byte_server):
    """The stop string `p + c` (c: several bytes) matches only once c's last byte is out;
    while c is incomplete the text ends in `p` + U+FFFD, and `p` must wait too."""
    body = {"messages": CHAT, "max_tokens": 48, "temperature": 1.0, "ignore_eos": True}
    with httpx.Client(base_url=byte_server.url, timeout=120) as client:
        for seed in range(40):
            full = client.post("/v1/chat/completions", json={**body, "seed": seed}).json()[
                "choices"][0]["message"]["content"]
            at = [i for i in range(1, len(full)) if ord(full[i]) > 0x7F and full[i] != "\ufffd"
                  and full[i - 1] != "\ufffd" and full.find(full[i - 1:i + 1]) == i - 1]
            if at:
                break
        assert at, "no seed gave a multi-byte character after another one"
        stop = full[at[0] - 1:at[0] + 1]
        req = {**body, "seed": seed, "stop": [stop]}
        whole = client.post("/v1/chat/completions", json=req).json()["choices"][0]
        assert whole["message"]["content"] == full[:at[0] - 1]
        chunks = sse(client, "/v1/chat/completions", req)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                       if c["choices"]) == full[:at[0] - 1]
        comp = {"prompt": [5, 6, 7], "max_tokens": 48, "seed": seed, "ignore_eos": True}
        text = client.post("/v1/completions", json=comp).json()["choices"][0]["text"]
        at = [i for i in range(1, len(text)) if ord(text[i]) > 0x7F and text[i] != "\ufffd"
              and text[i - 1] != "\ufffd" and text.find(text[i - 1:i + 1]) == i - 1]
        if at:
            comp["stop"] = [text[at[0] - 1:at[0] + 1]]
            parts = [c["choices"][0]["text"] for c in sse(client, "/v1/completions", comp)
                     if c["choices"]]
            assert "".join(parts) == text[:at[0] - 1]


@pytest.mark.parametrize("body, field", [({"rid": "x", "abort_all": "false"}, "abort_all"),
                                         ({"abort_all": 1}, "abort_all"),
                                         ([], "body")])
def test_abort_request_refuses_a_malformed_body(http, tokenizer, body, field):
    """`abort_all` is a boolean: the string "false" must not abort every request."""
    sp = {"max_new_tokens": 2, "ignore_eos": True}
    assert http.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(http.post, "/generate", json={
                "input_ids": tokenizer.encode("q"), "sampling_params": sp})
            wait_for(lambda: http.get("/get_server_info").json()["waiting"] == 1, "queued")
            r = http.post("/abort_request", json=body)
            http.post("/continue_generation", json={})
            out = queued.result(60)
    finally:
        http.post("/continue_generation", json={})
    assert r.status_code == 400 and r.json()["param"] == field, r.text
    assert out.json()["meta_info"]["finish_reason"]["type"] == "length"


def test_a_health_generate_whose_client_left_does_not_stay_queued(server, http):
    """/health_generate queues a 1-token request; when its client goes away (here while
    generation is paused) that request is dropped, not left to pile up and run later."""
    assert http.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.get(server.url + "/health_generate", timeout=0.5)
        wait_for(lambda: http.get("/get_server_info").json()["waiting"] == 0,
                 "the health request to leave the queue", timeout=10)
    finally:
        http.post("/continue_generation", json={})


def test_fleet_returning_server_with_a_slow_load_comes_back_on_the_target():
    """A server comes back on its launch weights and its load of the target outlives
    `update_timeout`: it is not routed to on the old weights meanwhile, the load is sent once,
    and it is marked up on the target once the load ends."""
    async def main():
        a = await Scripted("a").start()
        async with Fleet([a.url], probe_interval=0.02, update_timeout=0.3, backoff=0.01,
                         update_retry_interval=0.05, health_timeout=0.5) as fleet:
            await fleet.update_weights_from_disk("/ckpt/v2", "2")
            await a.stop()
            deadline = time.monotonic() + 10
            while fleet.servers[0].up and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not fleet.servers[0].up
            back = await Scripted("a2", port=a.port).start()  # on "default" again
            back.update_delay = 1.0
            seen_up_stale = False
            while back.version != "2" and time.monotonic() < deadline:
                seen_up_stale |= fleet.servers[0].up
                await asyncio.sleep(0.01)
            while not fleet.servers[0].up and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert not seen_up_stale and fleet.servers[0].up
            assert (await fleet.generate(input_ids=[1]))["meta_info"]["weight_version"] == "2"
            await asyncio.sleep(0.3)
            assert back.updates == [("/ckpt/v2", "2")]
            await back.stop()
    asyncio.run(main())


def test_client_stream_with_a_malformed_event_raises_server_unavailable():
    """A server whose stream carries an event that is not JSON is at fault: the client raises
    ServerUnavailable naming the path (a ServingError, so a fleet can retry), not a bare
    JSONDecodeError."""
    from aiohttp import web

    from clawjax.serving.client import SGLangClient, ServerUnavailable
    from clawjax.serving.launch import free_port

    async def handler(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"text": "a"}\n\ndata: {"text": tru\n\ndata: [DONE]\n\n')
        return resp

    async def main():
        app = web.Application()
        app.router.add_post("/generate", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with SGLangClient(f"http://127.0.0.1:{port}", timeout=30) as c:
                events = []
                with pytest.raises(ServerUnavailable, match="/generate"):
                    async for e in c.generate_stream({"input_ids": [1]}):
                        events.append(e)
                assert events == [{"text": "a"}]
        finally:
            await runner.cleanup()
    asyncio.run(main())


# --- hostile input: a 400 naming the field, never a 500 -------------------------------------
LONE = "ab\ud800cd"  # valid JSON ("\\ud800"), but no UTF-8 encoding: no tokenizer takes it


def post_raw(http, path: str, raw: bytes) -> httpx.Response:
    return http.post(path, content=raw, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("path, body, field", [
    ("/generate", {"text": LONE, "sampling_params": {"max_new_tokens": 2}}, "text"),
    ("/v1/completions", {"prompt": LONE, "max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}],
                              "max_tokens": 2}, "messages[0].content"),
], ids=["generate-text", "completions-prompt", "chat-content"])
def test_text_with_a_lone_surrogate_is_a_400_naming_the_field(http, path, body, field):
    r = post_raw(http, path, json.dumps(body).encode())  # ASCII: the surrogate as "\ud800"
    assert r.status_code == 400, r.text
    assert r.json()["param"] == field, r.text
    assert "'ab\\ud800cd'" in r.json()["message"] and "UTF-8" in r.json()["message"], r.text


def test_a_deeply_nested_body_is_a_400_naming_the_body(http):
    """JSON nested deeper than the parser's recursion allows (a 100 kB body) is bad JSON."""
    for path in ("/generate", "/v1/chat/completions", "/v1/completions",
                 "/update_weights_from_disk", "/abort_request", "/pause_generation"):
        r = post_raw(http, path, b"[" * 100_000)
        assert r.status_code == 400 and r.json()["param"] == "body", (path, r.text)
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("path, extra, field, expected", [
    ("/generate", {"stop": [f"s{i}" for i in range(fields.MAX_STOP_STRINGS + 1)]},
     "sampling_params.stop", f"at most {fields.MAX_STOP_STRINGS} stop strings"),
    ("/generate", {"stop": ["s", "x" * (fields.MAX_STOP_CHARS + 1)]},
     "sampling_params.stop[1]", f"at most {fields.MAX_STOP_CHARS} characters"),
    ("/generate", {"stop_token_ids": [1] * (fields.MAX_STOP_TOKEN_IDS + 1)},
     "sampling_params.stop_token_ids", f"at most {fields.MAX_STOP_TOKEN_IDS} token ids"),
    ("/v1/chat/completions", {"stop": ["s"] * (fields.MAX_STOP_STRINGS + 1)},
     "stop", f"at most {fields.MAX_STOP_STRINGS} stop strings"),
], ids=["stop-count", "stop-length", "stop-token-ids-count", "chat-stop-count"])
def test_stop_lists_past_their_bounds_are_refused_naming_the_field(http, tokenizer, path,
                                                                   extra, field, expected):
    """Every decode step of the one engine thread checks every stop string and stop id of
    every batched request: an unbounded list would stall them all."""
    if path == "/generate":
        body = {"input_ids": tokenizer.encode("q"),
                "sampling_params": {"max_new_tokens": 2, **extra}}
    else:
        body = {"messages": CHAT, "max_tokens": 2, **extra}
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["param"] == field and expected in r.json()["message"], r.text


def test_stop_lists_at_their_bounds_are_served(http, tokenizer):
    gen(http, input_ids=tokenizer.encode("q"), sampling_params={
        "max_new_tokens": 2, "stop_token_ids": [1] * fields.MAX_STOP_TOKEN_IDS,
        "stop": [f"{i:03}" + "x" * (fields.MAX_STOP_CHARS - 3)
                 for i in range(fields.MAX_STOP_STRINGS)]})
