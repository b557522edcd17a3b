"""The shape of a policy server's `/generate` answer, as the rollout proxy reads it.

`check_answer(result)` returns `result` when every field the proxy reads has the type it
expects, else raises `MalformedAnswer(field, value, expected)` naming the first bad field (the
proxy answers it as a 502: the upstream answer is at fault, not the request). Checked: `text` a
string, `output_ids` token ids, `meta_info` an object whose `prompt_tokens` /
`completion_tokens` are integers >= 0 and whose `output_token_logprobs` (and
`output_top_logprobs[i]`) hold SGLang triples `[logprob, token_id, text|None]` with a number
and a token id in [0, 2^31) (a sample stores int32 tokens). Absent fields are allowed: a turn
without ids or log-probs is served and not trained; a log-prob that is a number but not usable
(non-finite, positive) is the proxy's "not trainable" case, not a malformed answer.
"""

from __future__ import annotations

from typing import Any, Mapping

from clawjax.error_text import shown_value


class MalformedAnswer(ValueError):
    """A `/generate` answer field of the wrong type: `field` (dotted path), value, expected."""

    def __init__(self, field: str, value: Any, expected: str):
        self.field, self.value, self.expected = field, value, expected
        super().__init__(
            f"policy answer field {field!r} = {shown_value(value)}, expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token(value: Any) -> bool:
    """A token id a sample can hold (int32)."""
    return _is_int(value) and 0 <= value < 2 ** 31


def _check_entry(entry: Any, field: str) -> None:
    """`[logprob, token_id, text|None]`: a number and a token id."""
    if not isinstance(entry, (list, tuple)) or len(entry) < 2 or \
            isinstance(entry[0], bool) or not isinstance(entry[0], (int, float)) or \
            not _is_token(entry[1]):
        raise MalformedAnswer(field, entry, "[logprob (a number), token id (an integer in "
                              "[0, 2^31)), ...]")


def _check_entries(entries: Any, field: str) -> None:
    if not isinstance(entries, list):
        raise MalformedAnswer(field, entries, "a list")
    for i, entry in enumerate(entries):
        _check_entry(entry, f"{field}[{i}]")


def check_answer(result: Any) -> Any:
    """`result` unchanged when well-formed (module docstring); else `MalformedAnswer`."""
    if not isinstance(result, Mapping):
        raise MalformedAnswer("body", result, "a JSON object")
    text = result.get("text")
    if text is not None and not isinstance(text, str):
        raise MalformedAnswer("text", text, "a string")
    ids = result.get("output_ids")
    if ids is not None:
        if not isinstance(ids, list):
            raise MalformedAnswer("output_ids", ids, "a list of token ids")
        for i, t in enumerate(ids):
            if not _is_token(t):
                raise MalformedAnswer(f"output_ids[{i}]", t,
                                      "a token id (an integer in [0, 2^31))")
    meta = result.get("meta_info")
    if meta is None:
        return result
    if not isinstance(meta, Mapping):
        raise MalformedAnswer("meta_info", meta, "an object")
    for key in ("prompt_tokens", "completion_tokens"):
        value = meta.get(key)
        if value is not None and (not _is_int(value) or value < 0):
            raise MalformedAnswer(f"meta_info.{key}", value, "an integer >= 0")
    if meta.get("output_token_logprobs") is not None:
        _check_entries(meta["output_token_logprobs"], "meta_info.output_token_logprobs")
    tops = meta.get("output_top_logprobs")
    if tops is not None:
        if not isinstance(tops, list):
            raise MalformedAnswer("meta_info.output_top_logprobs", tops, "a list")
        for i, top in enumerate(tops):
            if top is not None:
                _check_entries(top, f"meta_info.output_top_logprobs[{i}]")
    return result
