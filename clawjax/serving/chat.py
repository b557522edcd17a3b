"""OpenAI chat-completions glue for the embedded server: the chat template, and the response
and stream-chunk bodies built from an engine `/generate` result.

`finish_reason` maps SGLang's `{"type": "stop"|"length"|"abort"}` to OpenAI's string;
`matched_stop` carries SGLang's `matched` (a token id or the stop string). The chat response
also carries `metadata.weight_version` (as SGLang's does) so a caller knows which weights
produced it.
"""

from __future__ import annotations

from clawjax.serving.fields import utf8_text
from clawjax.serving.protocol import ProtocolError


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template, with the assistant
    generation prompt appended. 400 (ProtocolError on `messages`) without a tokenizer, and
    when the template refuses the messages (its `raise_exception`, or fields it cannot
    render) or the tokenizer its text: the request's fault, not the server's (a 5xx would
    mark it down in a fleet). A string field with no UTF-8 encoding (a lone surrogate) is
    refused naming it, e.g. `messages[0].content`."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ProtocolError("messages", f"<{len(messages)} messages>",
                            "a server with a tokenizer and chat template (this model "
                            "directory has none; send /generate with input_ids instead)")
    import jinja2  # what transformers renders chat templates with

    for i, message in enumerate(messages):
        for key, value in message.items():
            if isinstance(value, str):
                utf8_text(value, f"messages[{i}].{key}")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    except (jinja2.TemplateError, TypeError, KeyError, AttributeError, ValueError) as e:
        raise ProtocolError("messages", f"<{len(messages)} messages>",
                            f"messages the model's chat template accepts (it raised "
                            f"{type(e).__name__}: {e})") from e


def _finish(result: dict) -> tuple[str, object]:
    finish = result["meta_info"]["finish_reason"] or {}
    return finish.get("type", "stop"), finish.get("matched")


def _logprobs(result: dict, tokenizer, start: int = 0) -> dict | None:
    """The OpenAI log-probs of the output tokens from `start` on (only those are decoded: a
    stream asks for each chunk's new tokens); None when the result carries none."""
    meta = result["meta_info"]
    if "output_token_logprobs" not in meta:
        return None
    entries = meta["output_token_logprobs"]
    tops = meta.get("output_top_logprobs") or [[] for _ in entries]

    def entry(lp, tok):
        s = tokenizer.decode([tok]) if tokenizer is not None else str(tok)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [dict(entry(lp, tok), top_logprobs=[entry(l2, t2) for l2, t2, _ in top])
                        for (lp, tok, _), top in zip(entries[start:], tops[start:])]}


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


def undecided_tail(text: str, stops) -> int:
    """How many trailing characters of a partial `text` may still change before the request
    ends: an incomplete UTF-8 character (decoded as U+FFFD) or the start of a stop string
    (`stops`: a str or a list of them), which is trimmed from the final text once it
    matches. A stop string may also start just before an incomplete character (its next
    character being that one), so the text before the U+FFFD tail is checked as well."""
    stops = [stops] if isinstance(stops, str) else stops or ()
    tail = len(text) - len(text.rstrip("\ufffd"))
    held = tail
    for stop in stops:
        for end in (len(text), len(text) - tail):
            for n in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:n]):
                    held = max(held, len(text) - end + n)
                    break
    return held


def chunk(result: dict, sent: str, model: str, created: int, first: bool,
          final: bool, *, stops=(), tokenizer=None, logprobs_from: int | None = None
          ) -> tuple[dict, str]:
    """A `chat.completion.chunk` carrying the text added since `sent`; returns it and the new
    `sent`. A partial result holds back the tail that may still change (`undecided_tail` of
    the request's `stops`), so the deltas add up to the final content and nothing is sent
    twice. `logprobs_from` (None: the request did not ask for log-probs) is the number of
    output tokens whose log-probs earlier chunks carried; this one carries the rest."""
    text = result["text"]
    if not final:
        text = text[:len(text) - undecided_tail(text, stops)]
    delta_text = text[len(sent):]  # `text` extends `sent`: its changing tail was held back
    delta: dict = {"content": delta_text}
    if first:
        delta["role"] = "assistant"
    logprobs = None
    if logprobs_from is not None:
        logprobs = _logprobs(result, tokenizer, logprobs_from) or {"content": []}
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}
    if final:
        choice["finish_reason"], choice["matched_stop"] = _finish(result)
    body = {"id": "chatcmpl-" + result["meta_info"]["id"], "object": "chat.completion.chunk",
            "created": created, "model": model, "choices": [choice]}
    if final:
        body["metadata"] = {"weight_version": result["meta_info"]["weight_version"]}
    return body, sent + delta_text


def usage_chunk(result: dict, model: str, created: int) -> dict:
    return {"id": "chatcmpl-" + result["meta_info"]["id"], "object": "chat.completion.chunk",
            "created": created, "model": model, "choices": [], "usage": _usage(result)}

