"""OpenAI (legacy) completions glue for the embedded server: the `text_completion` response and
stream-chunk bodies built from an engine `/generate` result, as SGLang's `/v1/completions`
serves them.

`finish_reason` and `matched_stop` follow `chat`. Log-probs use the legacy layout: `tokens`,
`token_logprobs`, `top_logprobs` (one `{token: logprob}` per position) and `text_offset` (each
token's character offset in the completion text).
"""

from __future__ import annotations

from clawjax.serving.chat import _finish, _usage, undecided_tail


def _logprobs(result: dict, tokenizer, start: int = 0) -> dict:
    """The legacy log-probs of the output tokens from `start` on."""
    meta = result["meta_info"]
    entries = meta.get("output_token_logprobs") or []
    tops = meta.get("output_top_logprobs") or [[] for _ in entries]

    def text(tok: int) -> str:
        return tokenizer.decode([tok]) if tokenizer is not None else str(tok)

    tokens = [text(tok) for _, tok, _ in entries]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens[start:],
            "token_logprobs": [lp for lp, _, _ in entries][start:],
            "top_logprobs": [{text(t2): l2 for l2, t2, _ in top} for top in tops[start:]],
            "text_offset": offsets[start:]}


def completion(result: dict, tokenizer, model: str, created: int, req) -> dict:
    """A `text_completion` body from a finished engine result."""
    reason, matched = _finish(result)
    return {
        "id": "cmpl-" + result["meta_info"]["id"], "object": "text_completion",
        "created": created, "model": model,
        "choices": [{"index": 0, "text": result["text"],
                     "logprobs": _logprobs(result, tokenizer) if req.logprobs is not None
                     else None,
                     "finish_reason": reason, "matched_stop": matched}],
        "usage": _usage(result),
        "metadata": {"weight_version": result["meta_info"]["weight_version"]},
    }


def chunk(result: dict, sent: str, model: str, created: int, final: bool, *, stops=(),
          tokenizer=None, logprobs_from: int | None = None) -> tuple[dict, str]:
    """A streamed `text_completion` carrying the text added since `sent` (a partial result
    holds back its `undecided_tail`, as `chat.chunk` does); returns it and the new `sent`.
    `logprobs_from`: as in `chat.chunk`."""
    text = result["text"]
    if not final:
        text = text[:len(text) - undecided_tail(text, stops)]
    delta = text[len(sent):]
    choice = {"index": 0, "text": delta, "finish_reason": None,
              "logprobs": None if logprobs_from is None
              else _logprobs(result, tokenizer, logprobs_from)}
    if final:
        choice["finish_reason"], choice["matched_stop"] = _finish(result)
    body = {"id": "cmpl-" + result["meta_info"]["id"], "object": "text_completion",
            "created": created, "model": model, "choices": [choice]}
    if final:
        body["metadata"] = {"weight_version": result["meta_info"]["weight_version"]}
    return body, sent + delta


def usage_chunk(result: dict, model: str, created: int) -> dict:
    return {"id": "cmpl-" + result["meta_info"]["id"], "object": "text_completion",
            "created": created, "model": model, "choices": [], "usage": _usage(result)}
