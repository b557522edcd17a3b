"""Request parsing for SGLang's native HTTP API (`/generate`, `/update_weights_from_disk`)
and the length check every generating endpoint shares; the one import point for the serving
request schema.

Field names are SGLang's own (`io_struct.GenerateReqInput`, `SamplingParams`, the OpenAI chat
schema). Every problem raises `ProtocolError(field, value, expected)`, which the server turns
into a 400 whose message names the field (dotted path), the value and what was expected.
The pieces live by job: `fields` (shared field validation, unknown-field policy),
`sampling_params` (`SamplingParams`), `openai_requests` (chat and completions bodies); their
public names are re-exported here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from clawjax.serving.fields import (ProtocolError, bool_field, check_keys, id_list, int_field,
                                    rid_field)
from clawjax.serving.openai_requests import (CHAT_MAX_TOKEN_KEYS, COMPLETION_MAX_TOKEN_KEYS,
                                             COMPLETION_MAX_TOKENS, ChatRequest,
                                             CompletionRequest, parse_chat, parse_completion)
from clawjax.serving.sampling_params import (GENERATE_MAX_NEW_TOKENS, SamplingParams,
                                             check_min_new_tokens, parse_sampling_params)

__all__ = [
    "ProtocolError", "SamplingParams", "parse_sampling_params", "GENERATE_MAX_NEW_TOKENS",
    "check_min_new_tokens",
    "GenerateRequest", "parse_generate", "GENERATE_MAX_TOKEN_KEYS", "check_lengths",
    "parse_update_weights",
    "ChatRequest", "parse_chat", "CHAT_MAX_TOKEN_KEYS", "CompletionRequest",
    "parse_completion", "COMPLETION_MAX_TOKENS", "COMPLETION_MAX_TOKEN_KEYS",
]


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


GENERATE_MAX_TOKEN_KEYS = ("max_new_tokens",)  # in sampling_params
_GENERATE_KEYS = {"text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
                  "top_logprobs_num", "return_text_in_logprobs", "stream", "rid"}


def parse_generate(body: Any, vocab_size: int) -> GenerateRequest:
    """Validates a `/generate` body. Length limits are checked by the engine once the prompt
    is tokenized (`check_lengths`)."""
    if not isinstance(body, Mapping):
        raise ProtocolError("body", body, "a JSON object")
    check_keys(body, _GENERATE_KEYS, "")
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
        ids = id_list(ids, "input_ids", vocab_size)
        if not ids:
            raise ProtocolError("input_ids", ids, "a non-empty list of token ids")
    rid = rid_field(body)
    return GenerateRequest(
        input_ids=ids, text=text,
        sampling=parse_sampling_params(body.get("sampling_params"), vocab_size),
        return_logprob=bool_field(body, "return_logprob", "", False),
        logprob_start_len=int_field(body, "logprob_start_len", "", -1, lo=-1),
        top_logprobs_num=int_field(body, "top_logprobs_num", "", 0, lo=0, hi=vocab_size),
        return_text_in_logprobs=bool_field(body, "return_text_in_logprobs", "", False),
        stream=bool_field(body, "stream", "", False), rid=rid)


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


def parse_update_weights(body: Any) -> tuple[str, str | None]:
    """`/update_weights_from_disk` body → (model_path, weight_version)."""
    if not isinstance(body, Mapping):
        raise ProtocolError("body", body, "a JSON object")
    check_keys(body, {"model_path", "weight_version", "load_format", "flush_cache",
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
