"""OpenAI chat-completions glue for the embedded server: the chat template, and the response
and stream-chunk bodies built from an engine `/generate` result.

`finish_reason` maps SGLang's `{"type": "stop"|"length"|"abort"}` to OpenAI's string;
`matched_stop` carries SGLang's `matched` (a token id or the stop string). The chat response
also carries `metadata.weight_version` (as SGLang's does) so a caller knows which weights
produced it.
"""

from __future__ import annotations

from clawjax.serving.protocol import ProtocolError


def encode_messages(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template, with the assistant
    generation prompt appended. 400 (ProtocolError on `messages`) without a tokenizer."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ProtocolError("messages", f"<{len(messages)} messages>",
                            "a server with a tokenizer and chat template (this model "
                            "directory has none; send /generate with input_ids instead)")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def _finish(result: dict) -> tuple[str, object]:
    finish = result["meta_info"]["finish_reason"] or {}
    return finish.get("type", "stop"), finish.get("matched")


def _logprobs(result: dict, tokenizer) -> dict | None:
    meta = result["meta_info"]
    if "output_token_logprobs" not in meta:
        return None
    tops = meta.get("output_top_logprobs") or [[] for _ in meta["output_token_logprobs"]]

    def entry(lp, tok):
        s = tokenizer.decode([tok]) if tokenizer is not None else str(tok)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [dict(entry(lp, tok), top_logprobs=[entry(l2, t2) for l2, t2, _ in top])
                        for (lp, tok, _), top in zip(meta["output_token_logprobs"], tops)]}


def _usage(result: dict) -> dict:
    meta = result["meta_info"]
    return {"prompt_tokens": meta["prompt_tokens"], "completion_tokens":
            meta["completion_tokens"],
            "total_tokens": meta["prompt_tokens"] + meta["completion_tokens"]}


def completion(result: dict, tokenizer, model: str, created: int, req) -> dict:
    """A `chat.completion` body from a finished engine result."""
    reason, matched = _finish(result)
    return {
        "id": "chatcmpl-" + result["meta_info"]["id"], "object": "chat.completion",
        "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                     "logprobs": _logprobs(result, tokenizer) if req.logprobs else None,
                     "finish_reason": reason, "matched_stop": matched}],
        "usage": _usage(result),
        "metadata": {"weight_version": result["meta_info"]["weight_version"]},
    }


def chunk(result: dict, sent: str, model: str, created: int, first: bool,
          final: bool) -> tuple[dict, str]:
    """A `chat.completion.chunk` carrying the text added since `sent`; returns it and the new
    `sent`."""
    text = result["text"]
    delta_text = text[len(sent):] if text.startswith(sent) else text
    delta: dict = {"content": delta_text}
    if first:
        delta["role"] = "assistant"
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
    if final:
        choice["finish_reason"], choice["matched_stop"] = _finish(result)
    body = {"id": "chatcmpl-" + result["meta_info"]["id"], "object": "chat.completion.chunk",
            "created": created, "model": model, "choices": [choice]}
    if final:
        body["metadata"] = {"weight_version": result["meta_info"]["weight_version"]}
    return body, text


def usage_chunk(result: dict, model: str, created: int) -> dict:
    return {"id": "chatcmpl-" + result["meta_info"]["id"], "object": "chat.completion.chunk",
            "created": created, "model": model, "choices": [], "usage": _usage(result)}

