"""Writing a generating request's answer from its engine events: one JSON body, or (streamed)
Server-Sent Events `data: {...}` per chunk, an optional usage chunk, then `data: [DONE]`.
A client that goes away (cancelled handler, reset connection) aborts its own request only."""

from __future__ import annotations

import asyncio
import json
from typing import Callable

from aiohttp import web

from clawjax.serving.context import ServerContext, status_of
from clawjax.serving.engine import Request

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


async def reply(request: web.Request, ctx: ServerContext, r: Request, events: asyncio.Queue, *,
                stream: bool, whole: Callable[[dict], dict],
                part: Callable[[dict, bool], dict],
                usage: Callable[[dict], dict] | None = None) -> web.StreamResponse:
    """Answers from `events` (("token", partial)..., ("done", result)): the body
    `whole(result)`, or when `stream` one chunk `part(result, final)` per event, then
    `usage(result)` when given, then `[DONE]`."""
    try:
        if not stream:
            while True:
                kind, result = await events.get()
                if kind == "done":
                    return web.json_response(whole(result), status=status_of(result))
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        while True:
            kind, result = await events.get()
            await resp.write(f"data: {json.dumps(part(result, kind == 'done'))}\n\n".encode())
            if kind == "done":
                if usage is not None:
                    await resp.write(f"data: {json.dumps(usage(result))}\n\n".encode())
                break
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        ctx.engine.abort(r.rid, "client disconnected", request=r)
        raise


async def openai_reply(request: web.Request, ctx: ServerContext, r: Request,
                       events: asyncio.Queue, req, whole, part, usage) -> web.StreamResponse:
    """`reply` for an OpenAI-style request: streamed when `req.stream`, with the usage chunk
    when `req.include_usage`."""
    return await reply(request, ctx, r, events, stream=req.stream, whole=whole, part=part,
                       usage=usage if req.include_usage else None)


def stream_state(req, sampling) -> dict:
    """What a stream has sent so far: `sent` text, whether the `first` chunk is still due,
    `n` output tokens whose log-probs went out (None: none asked), and the `stops` whose
    starts a partial text holds back (none when they are not trimmed)."""
    asked = req.logprobs is not None and req.logprobs is not False  # completions: 0 asks
    return {"sent": "", "first": True, "n": 0 if asked else None,
            "stops": () if sampling.no_stop_trim else sampling.stop}
