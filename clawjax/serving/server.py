"""The embedded server's HTTP layer (aiohttp): SGLang's native API plus OpenAI chat completions
and completions.

Endpoints (SGLang names and fields): POST `/generate` (optionally streamed as SSE), POST
`/v1/chat/completions` and `/v1/completions` (optionally streamed), GET `/v1/models`,
GET/POST `/health`, `/health_generate`, GET `/get_model_info`, `/get_server_info`,
`/get_weight_version`, GET/POST `/flush_cache`, POST `/update_weights_from_disk`,
`/pause_generation`, `/continue_generation`, `/abort_request`.

Bad input gets a 400 `{"object": "error", "message", "type", "param", "code"}` whose message
names the field, the value and what was expected; the server keeps serving. A client `rid`
already in flight is refused (400 naming `rid`: SGLang refuses a duplicate request id), so
`/abort_request` with a rid names one request. With an API key,
every endpoint but `/health` wants `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

import jax
from aiohttp import web

from clawjax.serving import chat, completions
from clawjax.serving.engine import Engine, Request
from clawjax.serving.protocol import (ProtocolError, check_lengths, parse_chat,
                                      parse_completion, parse_generate, parse_update_weights)

log = logging.getLogger(__name__)
MAX_BODY = 64 << 20


class ServerContext:
    """What the handlers share. `load_model(path) -> (model, config)` loads new weights (runs
    in a worker thread); `tokenizer` may be None (then only `input_ids` requests work)."""

    def __init__(self, engine: Engine, tokenizer, *, model_path: str, load_model,
                 api_key: str | None = None, served_model_name: str | None = None,
                 architectures: list[str] | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.load_model = load_model
        self.api_key = api_key
        self.served_model_name = served_model_name or model_path
        self.architectures = architectures or []
        self.update_lock = asyncio.Lock()


CTX: web.AppKey[ServerContext] = web.AppKey("ctx", ServerContext)


def error_response(status: int, message: str, param: str | None = None) -> web.Response:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}.get(
        status, "InternalServerError")
    return web.json_response({"object": "error", "message": message, "type": kind,
                              "param": param, "code": status}, status=status)


async def read_json(request: web.Request) -> Any:
    """The request's JSON body (`{}` when empty). Undecodable bytes or bad JSON (both
    ValueError) are a ProtocolError naming `body`."""
    raw = await request.read()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ProtocolError("body", raw[:60].decode("utf-8", "replace"),
                            f"valid JSON in UTF-8 ({e})")


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    ctx: ServerContext = request.app[CTX]
    if ctx.api_key and request.path != "/health":
        if request.headers.get("Authorization", "") != f"Bearer {ctx.api_key}":
            return error_response(401, "missing or wrong API key (Authorization: Bearer <key>)")
    try:
        return await handler(request)
    except ProtocolError as e:
        return error_response(400, str(e), e.field)
    except web.HTTPException:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - the server stays up; the client gets a 500
        log.exception("handler failed: %s %s", request.method, request.path)
        return error_response(500, f"internal error: {e!r}")


def tokenize_text(ctx: ServerContext, text: str, field: str) -> list[int]:
    """Token ids of a text prompt with the tokenizer's special tokens (a BOS where it adds
    one), as SGLang tokenizes `text`; chat prompts get theirs from the template instead."""
    if ctx.tokenizer is None:
        raise ProtocolError(field, text[:40], "input_ids: this model directory has no "
                            "tokenizer files, so only 'input_ids' requests are served")
    return ctx.tokenizer.encode(text)


def submit(ctx: ServerContext, prompt: list[int], params, *, rid: str | None, stream: bool,
           return_logprob: bool = False, logprob_start_len: int = -1,
           top_logprobs_num: int = 0, return_text_in_logprobs: bool = False
           ) -> tuple[Request, asyncio.Queue]:
    """Queues a request on the engine; its events arrive on the returned asyncio queue as
    ("token", partial) while streaming and one ("done", result)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def push(kind):
        def deliver(res):
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, res))
            except RuntimeError:  # the loop is gone (server shutting down): nobody waits
                pass
        return deliver

    req = Request(prompt=prompt, params=params, on_done=push("done"),
                  on_token=push("token") if stream else None, rid=rid or uuid.uuid4().hex,
                  return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                  top_logprobs_num=top_logprobs_num if return_logprob else 0,
                  return_text_in_logprobs=return_text_in_logprobs)
    ctx.engine.submit(req)
    return req, events


def status_of(result: dict) -> int:
    finish = result["meta_info"]["finish_reason"] or {}
    if finish.get("type") == "abort" and str(finish.get("message", "")).startswith("engine"):
        return 500
    return 200


def default_max_new_tokens(body: dict, params, prompt_len: int, context_len: int,
                           keys: tuple[str, ...]) -> None:
    """A request that did not set the output length gets min(default, what fits)."""
    if not any(k in body and body[k] is not None for k in keys):
        params.max_new_tokens = max(0, min(params.max_new_tokens, context_len - prompt_len))


async def generate(request: web.Request) -> web.StreamResponse:
    ctx: ServerContext = request.app[CTX]
    body = await read_json(request)
    req = parse_generate(body, ctx.engine.config.vocab_size)
    prompt = req.input_ids if req.input_ids is not None else tokenize_text(ctx, req.text, "text")
    default_max_new_tokens(body.get("sampling_params") or {}, req.sampling, len(prompt),
                           ctx.engine.context_len, ("max_new_tokens",))
    check_lengths(len(prompt), ctx.engine.context_len, req.sampling,
                  field="input_ids" if req.input_ids is not None else "text",
                  return_logprob=req.return_logprob, logprob_start_len=req.logprob_start_len)
    if req.sampling.stop and ctx.tokenizer is None:
        raise ProtocolError("sampling_params.stop", req.sampling.stop,
                            "stop_token_ids (stop strings need tokenizer files)")
    r, events = submit(ctx, prompt, req.sampling, rid=req.rid, stream=req.stream,
                       return_logprob=req.return_logprob,
                       logprob_start_len=req.logprob_start_len,
                       top_logprobs_num=req.top_logprobs_num,
                       return_text_in_logprobs=req.return_text_in_logprobs)
    try:
        if not req.stream:
            while True:
                kind, result = await events.get()
                if kind == "done":
                    return web.json_response(result, status=status_of(result))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        while True:
            kind, result = await events.get()
            if kind == "token":  # an incomplete UTF-8 character waits (as SGLang's does)
                text = result["text"]
                result["text"] = text[:len(text) - chat.undecided_tail(text, ())]
            await resp.write(f"data: {json.dumps(result)}\n\n".encode())
            if kind == "done":
                break
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        ctx.engine.abort(r.rid, "client disconnected", request=r)
        raise


async def openai_reply(request: web.Request, ctx: ServerContext, r: Request,
                       events: asyncio.Queue, req, whole, part, usage) -> web.StreamResponse:
    """Answers an OpenAI-style request from its engine events: the body `whole(result)`, or
    when `req.stream` the SSE chunks `part(result, final)`, then `usage(result)` when
    `req.include_usage`, then `[DONE]`. A client that goes away aborts the request."""
    try:
        if not req.stream:
            while True:
                kind, result = await events.get()
                if kind == "done":
                    return web.json_response(whole(result), status=status_of(result))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        while True:
            kind, result = await events.get()
            await resp.write(f"data: {json.dumps(part(result, kind == 'done'))}\n\n".encode())
            if kind == "done":
                if req.include_usage:
                    await resp.write(f"data: {json.dumps(usage(result))}\n\n".encode())
                break
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        ctx.engine.abort(r.rid, "client disconnected", request=r)
        raise


def stream_state(req, sampling) -> dict:
    """What a stream has sent so far: `sent` text, whether the `first` chunk is still due,
    `n` output tokens whose log-probs went out (None: none asked), and the `stops` whose
    starts a partial text holds back (none when they are not trimmed)."""
    asked = req.logprobs is not None and req.logprobs is not False  # completions: 0 asks
    return {"sent": "", "first": True, "n": 0 if asked else None,
            "stops": () if sampling.no_stop_trim else sampling.stop}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx: ServerContext = request.app[CTX]
    body = await read_json(request)
    req = parse_chat(body, ctx.engine.config.vocab_size)
    prompt = chat.encode_messages(ctx.tokenizer, req.messages)
    default_max_new_tokens(body, req.sampling, len(prompt), ctx.engine.context_len,
                           ("max_tokens", "max_completion_tokens"))
    check_lengths(len(prompt), ctx.engine.context_len, req.sampling, field="messages",
                  max_field="max_tokens")
    r, events = submit(ctx, prompt, req.sampling, rid=req.rid, stream=req.stream,
                       return_logprob=req.logprobs, top_logprobs_num=req.top_logprobs)
    name = req.model or ctx.served_model_name
    created = int(time.time())
    st = stream_state(req, req.sampling)

    def part(result: dict, final: bool) -> dict:
        out, st["sent"] = chat.chunk(result, st["sent"], name, created, st["first"], final,
                                     stops=st["stops"], tokenizer=ctx.tokenizer,
                                     logprobs_from=st["n"])
        st["first"] = False
        if st["n"] is not None:
            st["n"] = len(result["output_ids"])
        return out

    return await openai_reply(
        request, ctx, r, events, req,
        lambda res: chat.completion(res, ctx.tokenizer, name, created, req), part,
        lambda res: chat.usage_chunk(res, name, created))


async def v1_completions(request: web.Request) -> web.StreamResponse:
    ctx: ServerContext = request.app[CTX]
    body = await read_json(request)
    req = parse_completion(body, ctx.engine.config.vocab_size)
    prompt = req.prompt if isinstance(req.prompt, list) else \
        tokenize_text(ctx, req.prompt, "prompt")
    default_max_new_tokens(body, req.sampling, len(prompt), ctx.engine.context_len,
                           ("max_tokens",))
    check_lengths(len(prompt), ctx.engine.context_len, req.sampling, field="prompt",
                  max_field="max_tokens")
    if req.sampling.stop and ctx.tokenizer is None:
        raise ProtocolError("stop", req.sampling.stop,
                            "stop_token_ids (stop strings need tokenizer files)")
    r, events = submit(ctx, prompt, req.sampling, rid=req.rid, stream=req.stream,
                       return_logprob=req.logprobs is not None,
                       top_logprobs_num=req.logprobs or 0)
    name = req.model or ctx.served_model_name
    created = int(time.time())
    st = stream_state(req, req.sampling)

    def part(result: dict, final: bool) -> dict:
        out, st["sent"] = completions.chunk(result, st["sent"], name, created, final,
                                            stops=st["stops"], tokenizer=ctx.tokenizer,
                                            logprobs_from=st["n"])
        if st["n"] is not None:
            st["n"] = len(result["output_ids"])
        return out

    return await openai_reply(
        request, ctx, r, events, req,
        lambda res: completions.completion(res, ctx.tokenizer, name, created, req), part,
        lambda res: completions.usage_chunk(res, name, created))


async def update_weights_from_disk(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    body = await read_json(request)
    path, version = parse_update_weights(body)
    if body.get("abort_all_requests") is True:
        ctx.engine.abort(None, "aborted for a weight update (abort_all_requests)")
    # Shielded: a client that goes away does not cancel the load (as in SGLang), and the
    # lock stays held until it has applied, so a later update cannot be overtaken by it.
    ok, message = await asyncio.shield(asyncio.ensure_future(apply_update(ctx, path, version)))
    return web.json_response({"success": ok, "num_paused_requests": 0, "message": message},
                             status=200 if ok else 400)


async def apply_update(ctx: ServerContext, path: str, version: str | None) -> tuple[bool, str]:
    """Loads `path` and installs it as `version`, one update at a time: (success, message)."""
    loop = asyncio.get_running_loop()
    async with ctx.update_lock:
        # No weight_version keeps the label current when this update applies (SGLang), not
        # the one from before an update it waited for.
        version = version if version is not None else ctx.engine.weight_version
        try:
            model, config = await loop.run_in_executor(None, ctx.load_model, path)
            await loop.run_in_executor(None, ctx.engine.load_weights, model, config, version)
        except Exception as e:  # noqa: BLE001 - a bad checkpoint is the caller's problem
            log.warning("update_weights_from_disk(%s) failed: %r", path, e)
            return False, f"model_path = {path!r}: {e}"
        ctx.model_path = path
    return True, f"Succeeded to update model weights ({version})."


async def health(request: web.Request) -> web.Response:
    return web.Response(text="")


async def health_generate(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    params = parse_generate({"input_ids": [0], "sampling_params": {"max_new_tokens": 1}},
                            ctx.engine.config.vocab_size).sampling
    r, events = submit(ctx, [0], params, rid=None, stream=False)
    try:
        _, result = await asyncio.wait_for(events.get(), timeout=60)
    except (asyncio.TimeoutError, asyncio.CancelledError) as e:  # not left queued
        ctx.engine.abort(r.rid, "health check over", request=r)
        if isinstance(e, asyncio.CancelledError):
            raise
        return web.Response(status=503, text="generation timed out")
    return web.Response(status=status_of(result), text="")


async def get_model_info(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    return web.json_response({
        "model_path": ctx.model_path, "tokenizer_path": ctx.model_path
        if ctx.tokenizer is not None else None, "is_generation": True,
        "preferred_sampling_params": None, "weight_version": ctx.engine.weight_version,
        "has_image_understanding": False, "has_audio_understanding": False,
        "model_type": ctx.engine.config.model_type
        if hasattr(ctx.engine.config, "model_type") else None,
        "architectures": ctx.architectures})


async def get_server_info(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    return web.json_response({"version": "clawjax-embedded", "model_path": ctx.model_path,
                              "platform": jax.default_backend(),  # where the engine runs
                              "context_length": ctx.engine.context_len,
                              "max_running_requests": ctx.engine.max_batch,
                              **ctx.engine.stats()})


async def get_weight_version(request: web.Request) -> web.Response:
    return web.json_response({"weight_version": request.app[CTX].engine.weight_version})


async def flush_cache(request: web.Request) -> web.Response:
    # No prefix cache to flush: each request prefills its own slot.
    return web.Response(text="Cache flushed.")


async def pause_generation(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    body = await read_json(request)
    mode = body.get("mode", "abort") if isinstance(body, dict) else None
    if mode not in ("abort", "retract", "in_place"):
        raise ProtocolError("mode", mode, "'abort', 'retract' or 'in_place'")
    ctx.engine.pause()
    aborted = ctx.engine.abort(None, "paused (mode=abort)") if mode == "abort" else 0
    return web.json_response({"success": True, "message": f"paused ({mode})",
                              "num_aborted_requests": aborted})


async def continue_generation(request: web.Request) -> web.Response:
    request.app[CTX].engine.resume()
    return web.json_response({"success": True, "message": "continued"})


async def abort_request(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ProtocolError("body", body, "a JSON object")
    rid, abort_all = body.get("rid"), body.get("abort_all")
    abort_all = False if abort_all is None else abort_all
    if not isinstance(abort_all, bool):
        raise ProtocolError("abort_all", abort_all, "true or false")
    if not abort_all and not isinstance(rid, str):
        raise ProtocolError("rid", rid, "a request id string (or abort_all: true)")
    n = ctx.engine.abort(None if abort_all else rid, "aborted by /abort_request")
    return web.json_response({"success": True, "num_aborted_requests": n})


async def list_models(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    return web.json_response({"object": "list", "data": [
        {"id": ctx.served_model_name, "object": "model", "owned_by": "clawjax",
         "root": ctx.model_path, "max_model_len": ctx.engine.context_len}]})


def build_app(ctx: ServerContext) -> web.Application:
    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY)
    app[CTX] = ctx
    app.router.add_post("/generate", generate)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", v1_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/update_weights_from_disk", update_weights_from_disk)
    for path, fn in (("/health", health), ("/health_generate", health_generate),
                     ("/flush_cache", flush_cache)):
        app.router.add_get(path, fn)
        app.router.add_post(path, fn)
    app.router.add_get("/get_model_info", get_model_info)
    app.router.add_get("/get_server_info", get_server_info)
    app.router.add_get("/get_weight_version", get_weight_version)
    app.router.add_post("/pause_generation", pause_generation)
    app.router.add_post("/continue_generation", continue_generation)
    app.router.add_post("/abort_request", abort_request)

    async def on_cleanup(app):
        await asyncio.get_running_loop().run_in_executor(None, ctx.engine.close)

    app.on_cleanup.append(on_cleanup)
    return app
