"""The rollout proxy's calls to the policy fleet: SGLang `/generate`, whole or streamed.

`generate` retries a generation the fleet aborted (weights being swapped) up to
`MAX_ABORT_RETRIES` times; `generate_stream` turns a `/generate` stream into ("event", ...)
items and exactly one ("end", result) or ("error", RequestError). Every failure reaches the
agent as a `chatapi.RequestError` naming the OpenAI field: a 4xx of the server as a 400, an
unavailable fleet or repeated aborts as a 503, a malformed answer as a 502
(`clawjax.rollout.answers`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from clawjax.rollout import answers
from clawjax.rollout.chatapi import RequestError
from clawjax.serving.client import BadRequest, ServerUnavailable, ServingError
from clawjax.serving.openai_requests import openai_name

MAX_ABORT_RETRIES = 3


class GenerationFailed(RuntimeError):
    """The policy fleet could not serve the request (503 to the agent)."""


def _param(param: str | None, length_field: str = "max_tokens") -> str | None:
    """The OpenAI chat field a `/generate` error's `param` names (`length_field`: the one that
    set the output length)."""
    if param is None:
        return None
    if param == "input_ids":
        return "messages"
    return openai_name(param.removeprefix("sampling_params."), length_field)


def _upstream(field: str, value: Any, expected: str) -> RequestError:
    """A malformed policy server answer: a 502 naming the answer's field."""
    return RequestError(field, value, f"{expected} in the policy server's /generate answer",
                        status=502)


def check_answer(result: Any) -> dict:
    """`result` when its fields have the types the proxy reads (`clawjax.rollout.answers`);
    else a 502 `RequestError` naming the first bad field."""
    try:
        return answers.check_answer(result)
    except answers.MalformedAnswer as e:
        raise _upstream(e.field, e.value, e.expected) from None


def _aborted(result: dict) -> bool:
    finish = (result.get("meta_info") or {}).get("finish_reason") or {}
    return isinstance(finish, dict) and finish.get("type") == "abort"


async def generate(policy, body: dict, length_field: str = "max_tokens") -> dict:
    """One non-streaming `/generate` through the fleet. A 4xx becomes a RequestError naming
    the OpenAI field (`length_field` for the output length: `ChatCall.length_field`); an
    unavailable fleet or repeated aborts (weights being swapped) a 503."""
    for _ in range(MAX_ABORT_RETRIES):
        try:
            result = await policy.generate_raw(body)
        except BadRequest as e:
            raise RequestError(_param(e.param, length_field) or "body", "<request>",
                               f"what the policy server accepts: {e}", status=400) from e
        except ServingError as e:
            raise RequestError("model", "<policy fleet>", f"an available policy server: {e}",
                               status=503) from e
        check_answer(result)
        if not _aborted(result):
            return result
        await asyncio.sleep(0.05)
    raise RequestError("model", "<policy fleet>", "a generation that is not aborted (the "
                       f"fleet aborted it {MAX_ABORT_RETRIES} times)", status=503)


async def generate_stream(policy, body: dict, events: asyncio.Queue,
                          length_field: str = "max_tokens") -> None:
    """Streams `/generate` through the fleet onto `events`: ("event", sglang_event) while
    generating, then ("end", result) with the output ids / log-probs of the whole response, or
    ("error", RequestError): always exactly one of the two, whatever the server sends (a
    malformed stream is a 502). A server failure before the first event is retried elsewhere
    by the fleet; after it, the stream ends with an error (no replay)."""
    state = {"sent": False}

    async def consume(client):
        try:
            last, ids, logps, tops = None, [], [], []
            async for event in client.generate_stream(body):
                text = event.get("text")  # not an object: the generic 502 below
                if text is not None and not isinstance(text, str):
                    raise _upstream("text", text, "a string")
                last = event
                ids.extend(event.get("output_ids") or [])
                meta = event.get("meta_info") or {}
                logps.extend(meta.get("output_token_logprobs") or [])
                tops.extend(meta.get("output_top_logprobs") or [])
                state["sent"] = True
                await events.put(("event", event))
            return last, ids, logps, tops
        except ServerUnavailable as e:
            if state["sent"]:
                raise GenerationFailed(str(e)) from e
            raise

    try:
        last, ids, logps, tops = await policy.call(consume)
        if last is None or _aborted(last):
            raise RequestError("model", "<policy fleet>", "a generation that is not aborted",
                               status=503)
        result = dict(last)
        meta = dict(last.get("meta_info") or {})
        n = meta.get("completion_tokens", len(last.get("output_ids") or []))
        if len(last.get("output_ids") or []) != n and len(ids) == n:  # incremental stream
            result["output_ids"] = ids
            meta["output_token_logprobs"] = logps
            if "output_top_logprobs" in meta:   # asked for: every event carried its part
                meta["output_top_logprobs"] = tops
        result["meta_info"] = meta
        await events.put(("end", check_answer(result)))
    except BadRequest as e:
        await events.put(("error", RequestError(_param(e.param, length_field) or "body",
                                                "<request>",
                                                f"what the policy server accepts: {e}")))
    except (ServingError, GenerationFailed) as e:
        await events.put(("error", RequestError("model", "<policy fleet>",
                                                f"an available policy server: {e}", 503)))
    except RequestError as e:
        await events.put(("error", e))
    except Exception as e:  # noqa: BLE001 - a malformed stream (bad JSON, odd events): the
        # waiting handler must get an error, never wait forever for an event that won't come
        await events.put(("error", RequestError(
            "model", "<policy fleet>", f"a well-formed /generate stream from the policy "
            f"server (got {type(e).__name__}: {e})", status=502)))
