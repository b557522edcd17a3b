"""The embedded server's non-generating endpoints (SGLang names and fields): weight updates
(`/update_weights_from_disk`, one at a time), health checks, model / server / weight-version
info, `/v1/models`, `/flush_cache`, and pausing, resuming and aborting generation."""

from __future__ import annotations

import asyncio
import logging

import jax
from aiohttp import web

from clawjax.serving.context import CTX, ServerContext, read_json, status_of, submit
from clawjax.serving.protocol import ProtocolError, parse_generate, parse_update_weights

log = logging.getLogger(__name__)


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
