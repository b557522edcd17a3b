"""The OpenAI chat-completions surface of the rollout proxy: request parsing (with the session
fields), the SGLang `/generate` body, calls to the policy fleet, and the response / SSE bodies.

`parse_call(raw, headers, vocab_size)` raises `RequestError(field, value, expected)` for bad
input; the proxy answers it as an OpenAI error body with `param = field`. Fields the proxy does
not use (`user`, `tool_choice`, `response_format`, ...) are ignored, as OpenAI-compatible
servers commonly do; `n` must be 1.

Sampling fields sent to `/generate` are only those the request set (OpenAI names mapped to
SGLang's: max_tokens/max_completion_tokens → max_new_tokens, min_tokens → min_new_tokens,
seed → sampling_seed), validated with the embedded server's own rules first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import uuid
from typing import Any, Mapping

from clawjax.rollout import answers
from clawjax.serving.chat import undecided_tail
from clawjax.serving.client import BadRequest, ServerUnavailable, ServingError
from clawjax.serving.protocol import ProtocolError, parse_sampling_params

ROLES = ("system", "developer", "user", "assistant", "tool")
_SAMPLING = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
             "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
             "min_p": "min_p", "stop": "stop", "stop_token_ids": "stop_token_ids",
             "ignore_eos": "ignore_eos", "skip_special_tokens": "skip_special_tokens",
             "no_stop_trim": "no_stop_trim", "min_tokens": "min_new_tokens",
             "seed": "sampling_seed", "frequency_penalty": "frequency_penalty",
             "presence_penalty": "presence_penalty", "repetition_penalty": "repetition_penalty"}
_PENALTIES = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0}
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no", "")
MAX_ABORT_RETRIES = 3
MAX_SESSION_ID_BYTES = 256  # sample ids embed it; the buffer allows 1024-byte ids


class RequestError(ValueError):
    """A request the proxy refuses: `field` (dotted path), the value, what was expected."""

    def __init__(self, field: str, value: Any, expected: str, status: int = 400):
        self.field, self.value, self.expected, self.status = field, value, expected, status
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"field {field!r} = {shown}, expected {expected}")


class GenerationFailed(RuntimeError):
    """The policy fleet could not serve the request (503 to the agent)."""


@dataclasses.dataclass
class ChatCall:
    """One parsed request. `messages` is None for a close-only `session_done` call without
    messages (see `close_only`); message contents are strings (text parts joined). `sampling`
    holds SGLang sampling params."""
    messages: list[dict] | None
    sampling: dict
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    tools: list | None = None
    session_id: str | None = None
    turn_type: str = "main"
    session_done: bool = False
    episode: bool = False  # the session is a general-agent episode (samples wait for the outcome)
    outcome_reward: float | None = None  # the episode's verified outcome, sent on its last call

    @property
    def close_only(self) -> bool:
        """A `session_done` call of a session that generates nothing: no `messages`, or
        `messages` with `max_tokens` 0 (whose trailing user/tool messages are the next state of
        the session's pending main turn). Not a turn of its own."""
        return self.session_done and self.session_id is not None and (
            self.messages is None or self.sampling.get("max_new_tokens") == 0)


def _content(value: Any, field: str) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, Mapping) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise RequestError(f"{field}[{i}]", part, '{"type": "text", "text": "..."}')
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(field, value, "a string, null, or a list of text parts")


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RequestError("messages", value, "a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise RequestError(f"messages[{i}]", m, "an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role", m.get("role"), f"one of {ROLES}")
        message = dict(m)
        message["content"] = _content(m.get("content"), f"messages[{i}].content")
        out.append(message)
    return out


def _flag(body: Mapping, headers: Mapping, key: str, header: str) -> bool:
    if key in body and body[key] is not None:
        if not isinstance(body[key], bool):
            raise RequestError(key, body[key], "true or false")
        return body[key]
    value = headers.get(header)
    if value is None:
        return False
    if value.strip().lower() not in _TRUE + _FALSE:
        raise RequestError(header, value, "true or false (also 1/0, yes/no)")
    return value.strip().lower() in _TRUE


def _outcome(body: Mapping, headers: Mapping) -> float | None:
    """`outcome_reward` (body) or `X-Outcome-Reward` (header): a finite number, or None."""
    value, field = body.get("outcome_reward"), "outcome_reward"
    if value is None:
        value, field = headers.get("X-Outcome-Reward"), "X-Outcome-Reward"
        if value is None:
            return None
        try:
            value = float(value)
        except ValueError:
            raise RequestError(field, value, "a finite number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        raise RequestError(field, value, "a finite number")
    return float(value)


def _session(body: Mapping, headers: Mapping) -> tuple[str | None, str, bool]:
    sid = body.get("session_id")
    if sid is None:
        sid = headers.get("X-Session-Id")
        field = "X-Session-Id"
    else:
        field = "session_id"
    if sid is not None and (not isinstance(sid, str) or not sid.strip() or
                            len(sid.encode("utf-8", "replace")) > MAX_SESSION_ID_BYTES):
        raise RequestError(field, sid, f"a non-empty string of at most {MAX_SESSION_ID_BYTES} "
                           "bytes (UTF-8)")
    turn_type = body.get("turn_type")
    field = "turn_type"
    if turn_type is None:
        turn_type, field = headers.get("X-Turn-Type", "main"), "X-Turn-Type"
    if turn_type not in ("main", "side"):
        raise RequestError(field, turn_type, "'main' or 'side'")
    done = _flag(body, headers, "session_done", "X-Session-Done")
    return sid, turn_type, done


def parse_call(raw: bytes, headers: Mapping, vocab_size: int) -> ChatCall:
    """Parses and validates a `/v1/chat/completions` request body plus session headers."""
    try:
        body = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError("body", raw[:60].decode("utf-8", "replace"), f"valid JSON ({e})")
    if not isinstance(body, Mapping):
        raise RequestError("body", body, "a JSON object")
    sid, turn_type, done = _session(body, headers)
    episode = _flag(body, headers, "episode", "X-Episode")
    outcome = _outcome(body, headers)
    if "messages" not in body and done:
        if sid is None:
            raise RequestError("session_id", None, "a session id for a session_done call")
        return ChatCall(None, {}, session_id=sid, turn_type=turn_type, session_done=True,
                        episode=episode, outcome_reward=outcome)
    messages = _messages(body.get("messages"))
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):  # not True, not 1.0
        raise RequestError("n", n, "the integer 1 or null (one choice per request)")
    given = {k: body[k] for k in _SAMPLING if body.get(k) is not None}
    for key, neutral in _PENALTIES.items():  # passed on when set; the server may refuse them
        if key in given and (isinstance(given[key], bool) or
                             not isinstance(given[key], (int, float)) or
                             not math.isfinite(given[key])):
            raise RequestError(key, given[key], f"a finite number (default {neutral})")
    checked = {k: v for k, v in given.items() if k not in _PENALTIES}
    try:
        parse_sampling_params(checked, vocab_size, prefix="", aliases={
            k: v for k, v in _SAMPLING.items() if k != v and k not in _PENALTIES})
    except ProtocolError as e:
        field = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
                 "sampling_seed": "seed"}.get(e.field, e.field)
        raise RequestError(field, e.value, e.expected)
    sampling = {_SAMPLING[k]: v for k, v in given.items()}
    stream_options = body.get("stream_options")
    if stream_options is None:
        stream_options = {}
    if not isinstance(stream_options, Mapping):
        raise RequestError("stream_options", stream_options, "an object or null")
    include_usage = stream_options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise RequestError("stream_options.include_usage", include_usage,
                           "true or false (a JSON boolean) or null")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model", model, "a string")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise RequestError("tools", tools, "a list of tool definitions")
    top = body.get("top_logprobs")
    top = 0 if top is None else top
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
        raise RequestError("top_logprobs", top, "an integer in [0, 20]")
    return ChatCall(messages=messages, sampling=sampling, model=model,
                    stream=_flag(body, {}, "stream", ""),
                    include_usage=bool(include_usage),
                    logprobs=_flag(body, {}, "logprobs", ""), top_logprobs=top, tools=tools,
                    session_id=sid, turn_type=turn_type, session_done=done, episode=episode,
                    outcome_reward=outcome)


def generate_body(call: ChatCall, prompt_ids: list[int]) -> dict:
    """The SGLang `/generate` body for `call`: token ids, log-probs of the output tokens."""
    body = {"input_ids": prompt_ids, "sampling_params": dict(call.sampling),
            "return_logprob": True, "logprob_start_len": -1}
    if call.logprobs and call.top_logprobs:
        body["top_logprobs_num"] = call.top_logprobs
    return body


def _param(param: str | None) -> str | None:
    if param is None:
        return None
    if param == "input_ids":
        return "messages"
    name = param.removeprefix("sampling_params.")
    return {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
            "sampling_seed": "seed"}.get(name, name)


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


async def generate(policy, body: dict) -> dict:
    """One non-streaming `/generate` through the fleet. A 4xx becomes a RequestError naming
    the OpenAI field; an unavailable fleet or repeated aborts (weights being swapped) a 503."""
    for _ in range(MAX_ABORT_RETRIES):
        try:
            result = await policy.generate_raw(body)
        except BadRequest as e:
            raise RequestError(_param(e.param) or "body", "<request>", f"what the policy "
                               f"server accepts: {e}", status=400) from e
        except ServingError as e:
            raise RequestError("model", "<policy fleet>", f"an available policy server: {e}",
                               status=503) from e
        check_answer(result)
        if not _aborted(result):
            return result
        await asyncio.sleep(0.05)
    raise RequestError("model", "<policy fleet>", "a generation that is not aborted (the "
                       f"fleet aborted it {MAX_ABORT_RETRIES} times)", status=503)


async def generate_stream(policy, body: dict, events: asyncio.Queue) -> None:
    """Streams `/generate` through the fleet onto `events`: ("event", sglang_event) while
    generating, then ("end", result) with the output ids / log-probs of the whole response, or
    ("error", RequestError): always exactly one of the two, whatever the server sends (a
    malformed stream is a 502). A server failure before the first event is retried elsewhere
    by the fleet; after it, the stream ends with an error (no replay)."""
    state = {"sent": False}

    async def consume(client):
        try:
            last, ids, logps = None, [], []
            async for event in client.generate_stream(body):
                text = event.get("text")  # not an object: the generic 502 below
                if text is not None and not isinstance(text, str):
                    raise _upstream("text", text, "a string")
                last = event
                ids.extend(event.get("output_ids") or [])
                logps.extend((event.get("meta_info") or {}).get("output_token_logprobs") or [])
                state["sent"] = True
                await events.put(("event", event))
            return last, ids, logps
        except ServerUnavailable as e:
            if state["sent"]:
                raise GenerationFailed(str(e)) from e
            raise

    try:
        last, ids, logps = await policy.call(consume)
        if last is None or _aborted(last):
            raise RequestError("model", "<policy fleet>", "a generation that is not aborted",
                               status=503)
        result = dict(last)
        meta = dict(last.get("meta_info") or {})
        n = meta.get("completion_tokens", len(last.get("output_ids") or []))
        if len(last.get("output_ids") or []) != n and len(ids) == n:  # incremental stream
            result["output_ids"] = ids
            meta["output_token_logprobs"] = logps
        result["meta_info"] = meta
        await events.put(("end", check_answer(result)))
    except BadRequest as e:
        await events.put(("error", RequestError(_param(e.param) or "body", "<request>",
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


def error_of(e: Exception) -> dict:
    field = getattr(e, "field", None)
    return {"message": str(e), "type": "server_error", "param": field,
            "code": getattr(e, "status", 500)}


def sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def _finish(result: dict) -> str:
    finish = (result.get("meta_info") or {}).get("finish_reason") or {}
    return finish.get("type", "stop") if isinstance(finish, dict) else str(finish)


def _usage(result: dict) -> dict:
    meta = result.get("meta_info") or {}
    p, c = int(meta.get("prompt_tokens", 0)), int(meta.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


NEGLIGIBLE_LOGPROB = -9999.0  # OpenAI's log-prob for a token of negligible probability


def json_logprob(lp):
    """A policy log-prob as strict JSON holds it: −inf (a token drawn at probability 0 in
    floating point) as `NEGLIGIBLE_LOGPROB`, NaN or +inf as None; Python's json would write
    the non-JSON `-Infinity` / `NaN`. Finite values pass unchanged."""
    if isinstance(lp, float) and not math.isfinite(lp):
        return NEGLIGIBLE_LOGPROB if lp == -math.inf else None
    return lp


def _logprobs(result: dict, tokenizer) -> dict:
    meta = result.get("meta_info") or {}
    entries = meta.get("output_token_logprobs") or []
    tops = meta.get("output_top_logprobs") or [[] for _ in entries]

    def entry(lp, tok):
        s = tokenizer.decode([int(tok)])
        return {"token": s, "logprob": json_logprob(lp), "bytes": list(s.encode("utf-8"))}

    return {"content": [dict(entry(e[0], e[1]),
                             top_logprobs=[entry(t[0], t[1]) for t in (top or [])])
                        for e, top in zip(entries, tops)]}


def _metadata(result: dict, call: ChatCall, index: int) -> dict:
    meta = {"weight_version": (result.get("meta_info") or {}).get("weight_version")}
    if call.session_id is not None:
        meta.update(session_id=call.session_id, turn_index=index, turn_type=call.turn_type)
    return meta


def completion(result: dict, call: ChatCall, model: str, index: int, tokenizer) -> dict:
    """A `chat.completion` body for a finished `/generate` result."""
    return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion",
            "created": int(time.time()), "model": call.model or model,
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": result.get("text") or ""},
                         "logprobs": _logprobs(result, tokenizer) if call.logprobs else None,
                         "finish_reason": _finish(result)}],
            "usage": _usage(result), "metadata": _metadata(result, call, index)}


def _chunk(ident: str, created: int, model: str, delta: dict, finish=None) -> dict:
    return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish}]}


def delta_chunk(event: dict, sent: str, ident: str, created: int, model: str,
                first: bool, stops=None) -> tuple[dict | None, str]:
    """The chunk carrying the text added since `sent` (SGLang stream texts are cumulative);
    None when nothing new. Returns it and the new `sent`. Text is never sent twice: a text
    that does not extend `sent` (the final text, trimmed at a stop string) only adds what
    lies beyond `len(sent)`. For a partial event pass the request's `stops` (a str, a list
    or ()): the tail that may still change (`serving.chat.undecided_tail`) waits for a later
    event; `stops=None` (the final text) sends everything."""
    text = event.get("text") or ""
    if stops is not None:
        text = text[:len(text) - undecided_tail(text, stops)]
    new = text[len(sent):]
    if not new and not first:
        return None, sent
    delta = {"role": "assistant", "content": new} if first else {"content": new}
    return _chunk(ident, created, model, delta), sent + new


def final_chunks(result: dict, call: ChatCall, ident: str, created: int, model: str,
                 sent: str, first: bool, index: int) -> list[dict]:
    """The closing chunks: any text not yet sent, finish_reason (+ metadata), usage."""
    chunks = []
    model = call.model or model
    rest, _ = delta_chunk(result, sent, ident, created, model, first=first)
    if rest is not None:
        chunks.append(rest)
    last = _chunk(ident, created, model, {}, _finish(result))
    last["metadata"] = _metadata(result, call, index)
    chunks.append(last)
    if call.include_usage:
        usage = _chunk(ident, created, model, {})
        usage["choices"], usage["usage"] = [], _usage(result)
        chunks.append(usage)
    return chunks
