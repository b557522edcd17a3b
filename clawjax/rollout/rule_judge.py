"""A deterministic rule-based judge behind the OpenAI chat API:
`python -m clawjax.rollout.rule_judge --port P [--host H]`.

It reads the judge prompts of `clawjax.rollout.prompts` (the delimited next-state section) and
answers the way a model judge would, so the proxy's code path is the same with either:

PRM rule (`prm_score`, on the next state's text and role):
  -1  when the text contains (case-insensitive) one of NEGATIVE_PHRASES, or the role is "tool"
      and the text starts with "ERROR";
  +1  otherwise, when it contains one of POSITIVE_PHRASES, or the role is "tool" and the text
      starts with "OK";
   0  otherwise.
  A correction wins over praise ("Great, but that's wrong" → −1). Answer: one sentence, then
  `\\boxed{score}`.

Hint rule (`hint_of`): the next state's sentences (split after . ! ? and at line breaks) that
start with one of HINT_OPENERS (case-sensitive), joined by single spaces; when that text,
stripped, is longer than 10 characters the answer is `\\boxed{1}` and the hint between
`[HINT_START]` and `[HINT_END]`, otherwise `\\boxed{-1}`.

Any other chat request gets the fixed reply CHAT_REPLY. Streaming requests get the same answer
as one SSE chunk. The environments of `clawjax.rollout.envs` phrase their replies to match.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import time
import uuid

from aiohttp import web

from clawjax.cli_signals import serve_app_until_signal
from clawjax.rollout import prompts

POSITIVE_PHRASES = ("thank", "great", "perfect", "correct!")
NEGATIVE_PHRASES = ("wrong", "incorrect", "not what i asked", "that's not right", "please redo",
                    "try again")
TOOL_OK, TOOL_ERROR = "OK", "ERROR"
HINT_OPENERS = ("Please", "Remember", "Always", "Next time", "Hint:")
CHAT_REPLY = "I am a rule-based judge; send me a judge prompt to get a verdict."
MODEL_NAME = "rule-judge"
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def prm_score(role: str, text: str) -> int:
    """+1 / 0 / −1 for a next state by the keyword rules of the module docstring."""
    low = text.lower()
    stripped = text.lstrip()
    if any(p in low for p in NEGATIVE_PHRASES) or (role == "tool" and
                                                   stripped.startswith(TOOL_ERROR)):
        return -1
    if any(p in low for p in POSITIVE_PHRASES) or (role == "tool" and
                                                   stripped.startswith(TOOL_OK)):
        return 1
    return 0


def hint_of(text: str) -> str | None:
    """The hint sentences of a next state joined by spaces, or None when they are ≤ 10
    characters stripped (or absent)."""
    sentences = [s.strip() for s in _SENTENCE.split(text) if s.strip()]
    hint = " ".join(s for s in sentences if s.startswith(HINT_OPENERS)).strip()
    return hint if len(hint) > 10 else None


def answer(messages) -> str:
    """The judge's reply text to a chat request's `messages`."""
    parsed = prompts.parse_judge_prompt(messages)
    if parsed is None:
        return CHAT_REPLY
    kind, view = parsed
    if kind == "prm":
        score = prm_score(view.next_role, view.next_text)
        why = {1: "The next state shows the response served the user.",
               0: "The next state does not show whether the response worked.",
               -1: "The next state shows the response did not serve the user."}[score]
        return f"{why}\n\\boxed{{{score}}}"
    hint = hint_of(view.next_text)
    if hint is None:
        return "The next state carries no usable hindsight.\n\\boxed{-1}"
    return (f"The next state carries hindsight.\n\\boxed{{1}}\n"
            f"{prompts.HINT_START}{hint}{prompts.HINT_END}")


def _error(status: int, message: str, param: str | None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                        "param": param, "code": status}}, status=status)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return _error(400, f"body is not valid JSON ({e})", "body")
    if not isinstance(body, dict):
        return _error(400, f"body = {body!r:.80}, expected a JSON object", "body")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _error(400, f"field 'messages' = {messages!r:.80}, expected a non-empty list",
                      "messages")
    text = answer(messages)
    ident, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
    model = body.get("model") or MODEL_NAME
    usage = {"prompt_tokens": 0, "completion_tokens": len(text.split()),
             "total_tokens": len(text.split())}
    if not body.get("stream"):
        return web.json_response({
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": "stop"}], "usage": usage})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                          "logprobs": None, "finish_reason": "stop"}]}
    await resp.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
    await resp.write_eof()
    return resp


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [
        {"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "clawjax"}]})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    return app


async def serve(host: str, port: int) -> None:
    """Serves `build_app()` on host:port, prints `READY http://H:P`, stops on SIGINT/SIGTERM."""
    await serve_app_until_signal(build_app(), host, port, access_log=None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clawjax.rollout.rule_judge",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port = {args.port}, expected 1..65535")
    logging.basicConfig(level="WARNING")
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
