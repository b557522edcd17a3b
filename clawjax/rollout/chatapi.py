"""The OpenAI chat-completions requests of the rollout proxy: parsing (with the session
fields) and the SGLang `/generate` body. (Calls to the policy fleet:
`clawjax.rollout.policy_calls`; the response and SSE bodies: `clawjax.rollout.chat_bodies`.)

`parse_call(raw, headers, vocab_size)` raises `RequestError(field, value, expected)` for bad
input; the proxy answers it as an OpenAI error body with `param = field`. Fields the proxy does
not use (`user`, `tool_choice`, `response_format`, ...) are ignored, as OpenAI-compatible
servers commonly do; `n` must be 1.

Sampling fields sent to `/generate` are only those the request set (OpenAI names mapped to
SGLang's: max_tokens/max_completion_tokens → max_new_tokens, min_tokens → min_new_tokens,
seed → sampling_seed), validated with the embedded server's own rules first; a request that
sets no length sends `max_new_tokens: null`, which SGLang (and the embedded server) read as
"up to the rest of the context", as their own chat endpoints do.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

from clawjax.error_text import shown_value
from clawjax.serving.openai_requests import OPENAI_ALIASES, length_field, openai_name
from clawjax.serving.protocol import ProtocolError, parse_sampling_params

ROLES = ("system", "developer", "user", "assistant", "tool")
# OpenAI chat sampling fields → SGLang's (`OPENAI_ALIASES`, the embedded server's table; the
# others keep their names). Ordered: max_completion_tokens after max_tokens, so it wins.
_SAMPLING = {k: OPENAI_ALIASES.get(k, k) for k in (
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "stop",
    "stop_token_ids", "ignore_eos", "skip_special_tokens", "no_stop_trim", "min_tokens", "seed",
    "frequency_penalty", "presence_penalty", "repetition_penalty")}
_PENALTIES = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0}
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no", "")
MAX_SESSION_ID_BYTES = 256  # sample ids embed it; the buffer allows 1024-byte ids


class RequestError(ValueError):
    """A request the proxy refuses: `field` (dotted path), the value, what was expected."""

    def __init__(self, field: str, value: Any, expected: str, status: int = 400):
        self.field, self.value, self.expected, self.status = field, value, expected, status
        super().__init__(f"field {field!r} = {shown_value(value)}, expected {expected}")


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
    length_field: str = "max_tokens"  # the OpenAI field max_new_tokens came from (for errors)

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


def _utf8_size(text: str) -> int | None:
    """The length of `text` in UTF-8 bytes, or None when it has no UTF-8 encoding (a lone
    surrogate: JSON allows "\\ud83d", and aiohttp reads header bytes that are not UTF-8 with
    surrogate escapes). Such a string could never be written to the buffer's wire."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


def _session_id(body: Mapping, headers: Mapping) -> str | None:
    """`session_id` (body) or `X-Session-Id` (header): None, or a non-blank string of at most
    MAX_SESSION_ID_BYTES bytes in strict UTF-8 (the session id goes into every sample's ids)."""
    sid, field = body.get("session_id"), "session_id"
    if sid is None:
        sid, field = headers.get("X-Session-Id"), "X-Session-Id"
    if sid is None:
        return None
    size = _utf8_size(sid) if isinstance(sid, str) and sid.strip() else None
    if size is None or size > MAX_SESSION_ID_BYTES:
        raise RequestError(field, sid, f"a non-empty string of at most {MAX_SESSION_ID_BYTES} "
                           "bytes in UTF-8 (no lone surrogates)")
    return sid


def _session(body: Mapping, headers: Mapping) -> tuple[str | None, str, bool]:
    sid = _session_id(body, headers)
    turn_type = body.get("turn_type")
    field = "turn_type"
    if turn_type is None:
        turn_type, field = headers.get("X-Turn-Type", "main"), "X-Turn-Type"
    if turn_type not in ("main", "side"):
        raise RequestError(field, turn_type, "'main' or 'side'")
    done = _flag(body, headers, "session_done", "X-Session-Done")
    return sid, turn_type, done


def _top_logprobs(body: Mapping, logprobs: bool) -> int:
    """`top_logprobs`: an integer in [0, 20] (null: 0), and 0 unless `logprobs` is true (as
    OpenAI and the embedded server's parser require)."""
    top = body.get("top_logprobs")
    top = 0 if top is None else top
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
        raise RequestError("top_logprobs", top, "an integer in [0, 20]")
    if top and not logprobs:
        raise RequestError("top_logprobs", top, "0 or null unless 'logprobs' is true")
    return top


def parse_call(raw: bytes, headers: Mapping, vocab_size: int) -> ChatCall:
    """Parses and validates a `/v1/chat/completions` request body plus session headers. A body
    that is not JSON in UTF-8 is refused naming `body`: bad syntax or bytes, an integer of more
    digits than Python converts (all ValueError), or nesting deeper than the parser's
    recursion allows (RecursionError)."""
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, RecursionError) as e:
        raise RequestError("body", raw[:60].decode("utf-8", "replace"),
                           f"valid JSON ({e})") from None
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
    length = length_field(body)
    try:
        parse_sampling_params(checked, vocab_size, prefix="", aliases=OPENAI_ALIASES)
    except ProtocolError as e:
        raise RequestError(openai_name(e.field, length), e.value, e.expected)
    sampling = {_SAMPLING[k]: v for k, v in given.items()}
    # No length given: SGLang's chat sends max_new_tokens None (the rest of the context, which
    # its /generate honours too), not /generate's own default of 128.
    sampling.setdefault("max_new_tokens", None)
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
    logprobs = _flag(body, {}, "logprobs", "")
    top = _top_logprobs(body, logprobs)
    return ChatCall(messages=messages, sampling=sampling, model=model,
                    stream=_flag(body, {}, "stream", ""),
                    include_usage=bool(include_usage),
                    logprobs=logprobs, top_logprobs=top, tools=tools,
                    session_id=sid, turn_type=turn_type, session_done=done, episode=episode,
                    outcome_reward=outcome, length_field=length)


def generate_body(call: ChatCall, prompt_ids: list[int]) -> dict:
    """The SGLang `/generate` body for `call`: token ids, log-probs of the output tokens."""
    body = {"input_ids": prompt_ids, "sampling_params": dict(call.sampling),
            "return_logprob": True, "logprob_start_len": -1}
    if call.logprobs and call.top_logprobs:
        body["top_logprobs_num"] = call.top_logprobs
    return body
