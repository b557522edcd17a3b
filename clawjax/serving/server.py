"""The embedded server's HTTP application (aiohttp): the routes, API-key auth and error
answers. SGLang's native API plus OpenAI chat completions and completions.

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

The handlers live by job: `generation` (the generating endpoints), `admin` (the rest),
`replies` (JSON / SSE answers), `context` (what they share); their names are re-exported here.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from clawjax.serving.admin import (abort_request, apply_update, continue_generation,
                                   flush_cache, get_model_info, get_server_info,
                                   get_weight_version, health, health_generate, list_models,
                                   pause_generation, update_weights_from_disk)
from clawjax.serving.context import (CTX, ServerContext, read_json, status_of, submit,
                                     tokenize_text)
from clawjax.serving.fields import ProtocolError
from clawjax.serving.generation import (chat_completions, default_max_new_tokens, generate,
                                        v1_completions)
from clawjax.serving.replies import openai_reply, stream_state

__all__ = [
    "MAX_BODY", "ServerContext", "CTX", "build_app", "error_response", "errors_and_auth",
    "read_json", "tokenize_text", "submit", "status_of", "default_max_new_tokens",
    "openai_reply", "stream_state", "generate", "chat_completions", "v1_completions",
    "update_weights_from_disk", "apply_update", "health", "health_generate",
    "get_model_info", "get_server_info", "get_weight_version", "flush_cache",
    "pause_generation", "continue_generation", "abort_request", "list_models",
]

log = logging.getLogger(__name__)
MAX_BODY = 64 << 20


def error_response(status: int, message: str, param: str | None = None) -> web.Response:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}.get(
        status, "InternalServerError")
    return web.json_response({"object": "error", "message": message, "type": kind,
                              "param": param, "code": status}, status=status)


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
