"""Request parsing and validation for SGLang's native and OpenAI-compatible HTTP APIs.

Field names are SGLang's own (`io_struct.GenerateReqInput`, `SamplingParams`, the OpenAI chat
schema). Every problem raises `ProtocolError(field, value, expected)`, which the server turns
into a 400 whose message names the field (dotted path), the value and what was expected.

Unknown fields: a field we do not implement is accepted only when its value is "off" (None,
False, 0, "", [] or {}), so SGLang clients that send defaults keep working while a request that
relies on a feature we lack is refused instead of silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

# Sampling parameters we implement (SGLang names), with their defaults.
_NEUTRAL = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
            "n": 1}


class ProtocolError(ValueError):
    """A request breaks the API: names the field, the value and what was expected."""

    def __init__(self, field: str, value: Any, expected: str):
        self.field = field
        self.value = value
        self.expected = expected
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"field {field!r} = {shown}, expected {expected}")


@dataclasses.dataclass
class SamplingParams:
    """SGLang `sampling_params`. `top_k = -1` and `top_p = 1` mean no truncation; `temperature
    < 1e-6` is greedy (SGLang's sampling eps). `stop` strings need a tokenizer; `stop_token_ids`
    do not. While fewer than `min_new_tokens` are out, stop/EOS ids cannot be drawn."""
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    min_new_tokens: int = 0
    sampling_seed: int | None = None


@dataclasses.dataclass
class GenerateRequest:
    """One `/generate` request (single prompt). Exactly one of `input_ids` / `text` is set.
    `logprob_start_len = -1` means output tokens only (SPEC.md §7)."""
    input_ids: list[int] | None
    text: str | None
    sampling: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | None = None


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


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == 0 or value in ("", [], {})


def _check_keys(body: Mapping[str, Any], known: set[str], prefix: str) -> None:
    for key, value in body.items():
        if key in known:
            continue
        if key in _NEUTRAL:
            if value is not None and value != _NEUTRAL[key]:
                raise ProtocolError(prefix + key, value, f"{_NEUTRAL[key]!r} (not supported)")
            continue
        if not _is_off(value):
            raise ProtocolError(prefix + key, value,
                                "a supported field (this server does not implement it)")


def _int(body, key, prefix, default, lo=None, hi=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(prefix + key, value, "an integer")
    if lo is not None and value < lo:
        raise ProtocolError(prefix + key, value, f"an integer >= {lo}")
    if hi is not None and value > hi:
        raise ProtocolError(prefix + key, value, f"an integer <= {hi}")
    return value


def _float(body, key, prefix, default, lo=None, hi=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(prefix + key, value, "a finite number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ProtocolError(prefix + key, value, f"a number in [{lo}, {hi}]")
    return float(value)


def _bool(body, key, prefix, default):
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ProtocolError(prefix + key, value, "true or false")
    return value


def _stop_list(value, field) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise ProtocolError(field, value, "a non-empty string or a list of non-empty strings")
    return list(value)


def _id_list(value, field, vocab_size: int) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ProtocolError(field, value, "a list of token ids")
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ProtocolError(f"{field}[{i}]", t, f"a token id in [0, {vocab_size})")
    return list(value)


def parse_sampling_params(body: Any, vocab_size: int, prefix: str = "sampling_params.",
                          aliases: Mapping[str, str] | None = None) -> SamplingParams:
    """Validates a SGLang `sampling_params` dict (or the same keys of an OpenAI body when
    `aliases` maps OpenAI names such as `max_tokens` onto ours)."""
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        raise ProtocolError(prefix.rstrip("."), body, "a JSON object")
    body = dict(body)
    for theirs, ours in (aliases or {}).items():
        if body.get(theirs) is not None:
            body[ours] = body.pop(theirs)
        else:
            body.pop(theirs, None)
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    _check_keys(body, fields, prefix)
    p = SamplingParams(
        max_new_tokens=_int(body, "max_new_tokens", prefix, 128, lo=0),
        temperature=_float(body, "temperature", prefix, 1.0, lo=0.0, hi=100.0),
        top_p=_float(body, "top_p", prefix, 1.0, lo=0.0, hi=1.0),
        top_k=_int(body, "top_k", prefix, -1, lo=-1),
        min_p=_float(body, "min_p", prefix, 0.0, lo=0.0, hi=1.0),
        stop=_stop_list(body.get("stop"), prefix + "stop"),
        stop_token_ids=_id_list(body.get("stop_token_ids"), prefix + "stop_token_ids",
                                vocab_size),
        ignore_eos=_bool(body, "ignore_eos", prefix, False),
        skip_special_tokens=_bool(body, "skip_special_tokens", prefix, True),
        no_stop_trim=_bool(body, "no_stop_trim", prefix, False),
        min_new_tokens=_int(body, "min_new_tokens", prefix, 0, lo=0),
        sampling_seed=_int(body, "sampling_seed", prefix, None, lo=0),
    )
    if p.top_p == 0.0:
        raise ProtocolError(prefix + "top_p", 0.0, "a number in (0, 1]")
    if p.top_k == 0:
        raise ProtocolError(prefix + "top_k", 0, "-1 (off) or an integer >= 1")
    return p


def _rid(body: Mapping) -> str | None:
    """The request id a client chose (SGLang `rid`), None when absent."""
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, str):
        raise ProtocolError("rid", rid, "a string")
    return rid


_GENERATE_KEYS = {"text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
                  "top_logprobs_num", "return_text_in_logprobs", "stream", "rid"}


def parse_generate(body: Any, vocab_size: int) -> GenerateRequest:
    """Validates a `/generate` body. Length limits are checked by the engine once the prompt
    is tokenized (`check_lengths`)."""
    if not isinstance(body, Mapping):
        raise ProtocolError("body", body, "a JSON object")
    _check_keys(body, _GENERATE_KEYS, "")
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise ProtocolError("input_ids", ids, "exactly one of 'text' or 'input_ids'")
    if text is not None and not isinstance(text, str):
        raise ProtocolError("text", text, "a single string (batched prompts are not supported; "
                                          "send one request per prompt)")
    if ids is not None:
        if not isinstance(ids, list):
            raise ProtocolError("input_ids", ids, "a list of token ids")
        if ids and isinstance(ids[0], list):
            raise ProtocolError("input_ids", "[[...], ...]", "a single list of token ids "
                                "(batched prompts are not supported)")
        ids = _id_list(ids, "input_ids", vocab_size)
        if not ids:
            raise ProtocolError("input_ids", ids, "a non-empty list of token ids")
    rid = _rid(body)
    return GenerateRequest(
        input_ids=ids, text=text,
        sampling=parse_sampling_params(body.get("sampling_params"), vocab_size),
        return_logprob=_bool(body, "return_logprob", "", False),
        logprob_start_len=_int(body, "logprob_start_len", "", -1, lo=-1),
        top_logprobs_num=_int(body, "top_logprobs_num", "", 0, lo=0, hi=vocab_size),
        return_text_in_logprobs=_bool(body, "return_text_in_logprobs", "", False),
        stream=_bool(body, "stream", "", False), rid=rid)


def check_lengths(prompt_len: int, context_len: int, sampling: SamplingParams, *,
                  field: str, return_logprob: bool = False,
                  logprob_start_len: int = -1,
                  max_field: str = "sampling_params.max_new_tokens") -> None:
    """Rejects prompts that do not fit: `prompt_len + max_new_tokens <= context_len`, and a
    `logprob_start_len` outside the prompt. `field` names the prompt field for the message."""
    if prompt_len < 1:
        raise ProtocolError(field, "", "a prompt of at least 1 token")
    if prompt_len >= context_len:
        raise ProtocolError(field, f"<{prompt_len} tokens>",
                            f"a prompt shorter than the context length {context_len}")
    if prompt_len + sampling.max_new_tokens > context_len:
        raise ProtocolError(max_field, sampling.max_new_tokens,
                            f"at most {context_len - prompt_len} (context length {context_len} "
                            f"minus the {prompt_len} prompt tokens)")
    if return_logprob and logprob_start_len >= prompt_len:
        raise ProtocolError("logprob_start_len", logprob_start_len,
                            f"-1 or a position < the prompt length {prompt_len}")


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


def _openai_common(body: Mapping, vocab_size: int) -> tuple[SamplingParams, str | None, bool,
                                                            bool]:
    """The fields chat and completions share: (sampling, model, stream, include_usage)."""
    sampling = parse_sampling_params(
        {k: body[k] for k in _OPENAI_SAMPLING if k in body}, vocab_size, prefix="",
        aliases={"max_completion_tokens": "max_new_tokens", "max_tokens": "max_new_tokens",
                 "min_tokens": "min_new_tokens", "seed": "sampling_seed"})
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ProtocolError("model", model, "a string")
    stream_options = body.get("stream_options")
    if stream_options is None:
        stream_options = {}
    if not isinstance(stream_options, Mapping):
        raise ProtocolError("stream_options", stream_options, "an object or null")
    _check_keys(stream_options, {"include_usage"}, "stream_options.")
    return (sampling, model, _bool(body, "stream", "", False),
            _bool(stream_options, "include_usage", "stream_options.", False))


def parse_chat(body: Any, vocab_size: int) -> ChatRequest:
    """Validates an OpenAI `/v1/chat/completions` body (n = 1, text only)."""
    if not isinstance(body, Mapping):
        raise ProtocolError("body", body, "a JSON object")
    _check_keys(body, _CHAT_KEYS, "")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("messages", messages, "a non-empty list of messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ProtocolError(f"messages[{i}]", m, "an object with 'role' and 'content'")
        if m.get("role") not in _CHAT_ROLES:
            raise ProtocolError(f"messages[{i}].role", m.get("role"), f"one of {_CHAT_ROLES}")
        _check_keys(m, {"role", "content", *_MESSAGE_EXTRAS}, f"messages[{i}].")
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
    logprobs = _bool(body, "logprobs", "", False)
    top = _int(body, "top_logprobs", "", 0, lo=0, hi=min(20, vocab_size))
    if top and not logprobs:  # OpenAI: top_logprobs requires logprobs = true
        raise ProtocolError("top_logprobs", top, "0 or null unless 'logprobs' is true")
    return ChatRequest(messages=parsed, sampling=sampling, model=model, stream=stream,
                       include_usage=include_usage, logprobs=logprobs, top_logprobs=top,
                       rid=_rid(body))


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
    _check_keys(body, _COMPLETION_KEYS, "")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and
                                                   not isinstance(t, bool) for t in prompt):
        prompt = _id_list(prompt, "prompt", vocab_size)
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
        logprobs=_int(body, "logprobs", "", None, lo=0, hi=min(20, vocab_size)),
        rid=_rid(body))


def parse_update_weights(body: Any) -> tuple[str, str | None]:
    """`/update_weights_from_disk` body → (model_path, weight_version)."""
    if not isinstance(body, Mapping):
        raise ProtocolError("body", body, "a JSON object")
    _check_keys(body, {"model_path", "weight_version", "load_format", "flush_cache",
                       "abort_all_requests", "is_async", "torch_empty_cache", "keep_pause",
                       "recapture_cuda_graph", "token_step"}, "")
    path = body.get("model_path")
    if not isinstance(path, str) or not path:
        raise ProtocolError("model_path", path, "a non-empty directory path")
    version = body.get("weight_version")
    if version is not None and not isinstance(version, str):
        raise ProtocolError("weight_version", version, "a string")
    fmt = body.get("load_format")
    if fmt not in (None, "auto", "safetensors"):
        raise ProtocolError("load_format", fmt, "null, 'auto' or 'safetensors'")
    return path, version
