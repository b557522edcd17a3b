"""The rollout proxy's OpenAI response bodies: `chat.completion`, its SSE chunks, errors.

Bodies are built from a finished SGLang `/generate` result (`text`, `output_ids`, `meta_info`
with `output_token_logprobs` `[(logprob, token_id, None), ...]`, `finish_reason`,
`prompt_tokens`, `completion_tokens`, `weight_version`). Log-probs are written as strict JSON
(`json_logprob`). Streamed text is never sent twice (`delta_chunk`); nor are streamed
log-probs (`add_logprobs`, `final_chunks`): joined, the chunks' `logprobs.content` lists are
the non-streamed `logprobs.content` of the same answer.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Mapping

from clawjax.rollout.answers import MalformedAnswer, check_answer
from clawjax.rollout.chatapi import ChatCall
from clawjax.serving.chat import undecided_tail


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


def _logprobs(result: dict, tokenizer, start: int = 0) -> dict:
    """The `logprobs` object of `result`'s output tokens from `start` on (0: all of them): one
    entry per `output_token_logprobs` triple, its top ones from `output_top_logprobs` (absent:
    none); a shorter `output_top_logprobs` ends the list."""
    meta = result.get("meta_info") or {}
    entries = meta.get("output_token_logprobs") or []
    tops = meta.get("output_top_logprobs") or [[] for _ in entries]

    def entry(lp, tok):
        s = tokenizer.decode([int(tok)])
        return {"token": s, "logprob": json_logprob(lp), "bytes": list(s.encode("utf-8"))}

    return {"content": [dict(entry(e[0], e[1]),
                             top_logprobs=[entry(t[0], t[1]) for t in (top or [])])
                        for e, top in zip(entries[start:], tops[start:])]}


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


def _first_entry(meta: Mapping) -> int:
    """The output token whose log-prob is the first entry of a stream event's `meta`: 0 for a
    cumulative event (SGLang's default, the embedded server); for an incremental one (SGLang's
    `incremental_streaming_output`: the lists hold the new tokens only, `completion_tokens`
    counts them all) the tokens of the earlier events."""
    entries, n = meta.get("output_token_logprobs"), meta.get("completion_tokens")
    if not isinstance(entries, list) or not isinstance(n, int) or isinstance(n, bool):
        return 0
    return max(n - len(entries), 0)


def _well_formed_from(meta: Mapping, start: int) -> bool:
    """Whether the log-prob lists of an (unchecked) stream event hold well-formed triples
    from entry `start` on: only those are read, so a long stream checks each entry once."""
    part = {key: meta[key][start:] if isinstance(meta.get(key), list) else meta.get(key)
            for key in ("output_token_logprobs", "output_top_logprobs")}
    try:
        check_answer({"meta_info": part})
    except MalformedAnswer:
        return False
    return True


def add_logprobs(chunk: dict, event: dict, tokenizer, logged: int) -> int:
    """Sets the `logprobs` of a delta `chunk` to `{"content": [...]}` for the output tokens of
    the partial stream `event` that earlier chunks did not carry (`logged` of them did: the
    entries are those of `completion`'s `logprobs.content` from `logged` on, each sent once);
    returns the new count. An event without them (an incremental event after tokens not yet
    sent) or with malformed ones adds none: the closing chunks carry the rest
    (`final_chunks`), and a malformed answer ends the stream with a 502 there."""
    meta = event.get("meta_info")
    start = logged - _first_entry(meta) if isinstance(meta, Mapping) else -1
    if start < 0 or not _well_formed_from(meta, start):
        new = {"content": []}
    else:
        new = _logprobs(event, tokenizer, start)
    chunk["choices"][0]["logprobs"] = new
    return logged + len(new["content"])


def final_chunks(result: dict, call: ChatCall, ident: str, created: int, model: str,
                 sent: str, first: bool, index: int, tokenizer=None,
                 logged: int = 0) -> list[dict]:
    """The closing chunks: any text not yet sent, finish_reason (+ metadata), usage. With
    `call.logprobs`, the log-probs of the output tokens from `logged` on (those the delta
    chunks did not carry, `add_logprobs`) come with the text, in a chunk of their own (empty
    content) when no text is left; the finish chunk's `logprobs` stays null, as OpenAI's."""
    chunks = []
    model = call.model or model
    rest, _ = delta_chunk(result, sent, ident, created, model, first=first)
    if call.logprobs:
        left = _logprobs(result, tokenizer, logged)
        if rest is None and left["content"]:
            rest = _chunk(ident, created, model, {"content": ""})
        if rest is not None:
            rest["choices"][0]["logprobs"] = left
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
