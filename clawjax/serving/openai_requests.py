"""Request parsing for the OpenAI-compatible endpoints as SGLang serves them:
`/v1/chat/completions` (`parse_chat`) and `/v1/completions` (`parse_completion`).

OpenAI sampling names map onto SGLang's (`max_tokens` / `max_completion_tokens` →
`max_new_tokens`, `min_tokens` → `min_new_tokens`, `seed` → `sampling_seed`). Output length
when the request sets none: completions get OpenAI's and SGLang's 16
(`COMPLETION_MAX_TOKENS`); chat gets the rest of the context, which only the server knows
once the prompt is templated (it sets it; see `generation.default_max_new_tokens`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from clawjax.serving.fields import (ProtocolError, bool_field, check_keys, id_list, int_field,
                                    rid_field)
from clawjax.serving.sampling_params import SamplingParams, parse_sampling_params


@dataclasses.dataclass
class ChatRequest:
    """One `/v1/chat/completions` request (n = 1). `messages` are `{"role", "content"}` with
    string content, plus the `name`, `tool_calls`, `tool_call_id` and `reasoning_content` a
    message carries (for the chat template). `include_usage` is
    `stream_options.include_usage` (a final usage chunk)."""
    messages: list[dict[str, Any]]
    sampling: SamplingParams
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    rid: str | None = None


@dataclasses.dataclass
class CompletionRequest:
    """One `/v1/completions` request (n = 1, no echo / suffix / best_of). `prompt` is a string
    or one list of token ids; `logprobs` (None: none) is also the number of top alternatives
    per token (SGLang: `top_logprobs_num = logprobs`)."""
    prompt: str | list[int]
    sampling: SamplingParams
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    rid: str | None = None


CHAT_MAX_TOKEN_KEYS = ("max_tokens", "max_completion_tokens")
_CHAT_KEYS = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p",
              "top_k", "min_p", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens",
              "no_stop_trim", "min_tokens", "seed", "stream", "stream_options", "logprobs",
              "top_logprobs", "user", "rid"}
_CHAT_ROLES = ("system", "user", "assistant", "tool")
# Message fields besides role and content that the chat template gets (when not null).
_MESSAGE_EXTRAS = {"name": str, "tool_calls": list, "tool_call_id": str,
                   "reasoning_content": str}


def _message_text(content: Any, field: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise ProtocolError(f"{field}[{i}]", part, '{"type": "text", "text": str}')
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise ProtocolError(field, content, "a string or a list of text parts")


_OPENAI_SAMPLING = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                    "min_p", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens",
                    "no_stop_trim", "min_tokens", "seed")


def length_field(body: Mapping, keys: tuple[str, ...] = CHAT_MAX_TOKEN_KEYS) -> str:
    """The body's field the output length comes from: the last of `keys` set (not null), as
    they are applied in order (`max_completion_tokens` wins over `max_tokens`); `keys[0]`
    when none is set."""
    return next((k for k in reversed(keys) if body.get(k) is not None), keys[0])


# OpenAI sampling names → SGLang's, applied in order: max_completion_tokens overrides max_tokens
# when both are set, as SGLang's chat adapter does (`max_completion_tokens or max_tokens`).
OPENAI_ALIASES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                  "min_tokens": "min_new_tokens", "seed": "sampling_seed"}
# SGLang's names back to OpenAI's, but for max_new_tokens (two sources: `length_field`).
_OPENAI_NAME = {ours: theirs for theirs, ours in OPENAI_ALIASES.items()
                if ours != "max_new_tokens"}


def openai_name(sglang_field: str, length: str = "max_tokens") -> str:
    """The OpenAI field an SGLang sampling field came from (`length`: the one that set
    `max_new_tokens`, see `length_field`); other names are their own."""
    if sglang_field == "max_new_tokens":
        return length
    return _OPENAI_NAME.get(sglang_field, sglang_field)


def _openai_common(body: Mapping, vocab_size: int) -> tuple[SamplingParams, str | None, bool,
                                                            bool]:
    """The fields chat and completions share: (sampling, model, stream, include_usage). A bad
    sampling value is refused under the OpenAI name the request used (`max_tokens` or
    `max_completion_tokens`, `min_tokens`, `seed`), not SGLang's that it maps onto."""
    try:
        sampling = parse_sampling_params(
            {k: body[k] for k in _OPENAI_SAMPLING if k in body}, vocab_size, prefix="",
            aliases=OPENAI_ALIASES)
    except ProtocolError as e:
        raise ProtocolError(openai_name(e.field, length_field(body)), e.value,
                            e.expected) from None
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ProtocolError("model", model, "a string")
    stream_options = body.get("stream_options")
    if stream_options is None:
        stream_options = {}
    if not isinstance(stream_options, Mapping):
        raise ProtocolError("stream_options", stream_options, "an object or null")
    check_keys(stream_options, {"include_usage"}, "stream_options.")
    return (sampling, model, bool_field(body, "stream", "", False),
            bool_field(stream_options, "include_usage", "stream_options.", False))


def parse_chat(body: Any, vocab_size: int) -> ChatRequest:
    """Validates an OpenAI `/v1/chat/completions` body (n = 1, text only)."""
    if not isinstance(body, Mapping):
        raise ProtocolError("body", body, "a JSON object")
    check_keys(body, _CHAT_KEYS, "")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("messages", messages, "a non-empty list of messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ProtocolError(f"messages[{i}]", m, "an object with 'role' and 'content'")
        if m.get("role") not in _CHAT_ROLES:
            raise ProtocolError(f"messages[{i}].role", m.get("role"), f"one of {_CHAT_ROLES}")
        check_keys(m, {"role", "content", *_MESSAGE_EXTRAS}, f"messages[{i}].")
        msg = {"role": m["role"],
               "content": _message_text(m.get("content"), f"messages[{i}].content")}
        for key, kind in _MESSAGE_EXTRAS.items():  # for the chat template, as SGLang does
            if m.get(key) is not None:
                if not isinstance(m[key], kind):
                    raise ProtocolError(f"messages[{i}].{key}", m[key],
                                        "a list" if kind is list else "a string")
                msg[key] = m[key]
        parsed.append(msg)
    sampling, model, stream, include_usage = _openai_common(body, vocab_size)
    logprobs = bool_field(body, "logprobs", "", False)
    top = int_field(body, "top_logprobs", "", 0, lo=0, hi=min(20, vocab_size))
    if top and not logprobs:  # OpenAI: top_logprobs requires logprobs = true
        raise ProtocolError("top_logprobs", top, "0 or null unless 'logprobs' is true")
    return ChatRequest(messages=parsed, sampling=sampling, model=model, stream=stream,
                       include_usage=include_usage, logprobs=logprobs, top_logprobs=top,
                       rid=rid_field(body))


COMPLETION_MAX_TOKEN_KEYS = ("max_tokens",)
_COMPLETION_KEYS = {"prompt", "model", "max_tokens", "temperature", "top_p", "top_k", "min_p",
                    "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens",
                    "no_stop_trim", "min_tokens", "seed", "stream", "stream_options",
                    "logprobs", "user", "rid"}
COMPLETION_MAX_TOKENS = 16  # OpenAI's and SGLang's default `max_tokens` for completions


def parse_completion(body: Any, vocab_size: int) -> CompletionRequest:
    """Validates an OpenAI `/v1/completions` body (one prompt, n = 1, no echo)."""
    if not isinstance(body, Mapping):
        raise ProtocolError("body", body, "a JSON object")
    body = dict(body)
    if body.get("best_of") in (None, 1):  # 1 is the default: one candidate, as n = 1
        body.pop("best_of", None)
    check_keys(body, _COMPLETION_KEYS, "")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and
                                                   not isinstance(t, bool) for t in prompt):
        prompt = id_list(prompt, "prompt", vocab_size)
    elif not isinstance(prompt, str) or not prompt:
        raise ProtocolError("prompt", prompt, "a non-empty string or one non-empty list of "
                            "token ids (batched prompts are not supported; send one request "
                            "per prompt)")
    sampling, model, stream, include_usage = _openai_common(body, vocab_size)
    if body.get("max_tokens") is None:
        sampling.max_new_tokens = COMPLETION_MAX_TOKENS
    return CompletionRequest(
        prompt=prompt, sampling=sampling, model=model, stream=stream,
        include_usage=include_usage,
        logprobs=int_field(body, "logprobs", "", None, lo=0, hi=min(20, vocab_size)),
        rid=rid_field(body))
