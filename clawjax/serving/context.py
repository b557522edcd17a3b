"""What the embedded server's handlers share: the `ServerContext` (engine, tokenizer, model
path, API key), the request body as JSON, text → token ids, and the bridge that queues a
request on the engine thread and carries its events back to the handler's event loop."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from aiohttp import web

from clawjax.serving.engine import Engine, Request
from clawjax.serving.fields import ProtocolError, utf8_text


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


async def read_json(request: web.Request) -> Any:
    """The request's JSON body (`{}` when empty). Undecodable bytes or bad JSON (both
    ValueError), and arrays or objects nested deeper than the parser's recursion allows
    (RecursionError: `[` * 100000 is a 100 kB body), are a ProtocolError naming `body`."""
    raw = await request.read()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ProtocolError("body", raw[:60].decode("utf-8", "replace"),
                            f"valid JSON in UTF-8, not nested too deeply ({e})") from None


def tokenize_text(ctx: ServerContext, text: str, field: str) -> list[int]:
    """Token ids of a text prompt with the tokenizer's special tokens (a BOS where it adds
    one), as SGLang tokenizes `text`; chat prompts get theirs from the template instead.
    Text with no UTF-8 encoding (a lone surrogate) is a ProtocolError naming `field`."""
    if ctx.tokenizer is None:
        raise ProtocolError(field, text[:40], "input_ids: this model directory has no "
                            "tokenizer files, so only 'input_ids' requests are served")
    return ctx.tokenizer.encode(utf8_text(text, field))


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
    """The HTTP status of a finished result: 500 when the engine (not the request) failed."""
    finish = result["meta_info"]["finish_reason"] or {}
    if finish.get("type") == "abort" and str(finish.get("message", "")).startswith("engine"):
        return 500
    return 200
