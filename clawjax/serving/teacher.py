"""Teacher log-probs of given response tokens under a given prompt (SPEC.md §7).

One `/generate` call scores `prompt ⊕ response` without generating: `max_new_tokens = 0`,
`return_logprob`, `logprob_start_len = P - 1` (P = len(prompt)). SGLang answers
`meta_info.input_token_logprobs` for positions P-1 .. N-1 and the entry AT `logprob_start_len`
is None, so dropping it leaves exactly one `(logprob, token_id, _)` per response token,
aligned with `response_ids`. (`logprob_start_len = P` would lose the first response token.)

The answer is checked, never patched: wrong length, a token id that differs from the response,
a None or non-finite log-prob, a top-K list of the wrong width, or any entry of another shape
(an object, a number, a non-integer token id) raises `TeacherLogprobError`; nothing is
zero-filled. (Rounding slightly above 0 is the caller's to judge: see
`clawjax.rollout.emit.POSITIVE_LOGP_SLACK`.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np


class TeacherLogprobError(ValueError):
    """The server's answer does not cover the response exactly; names what is wrong."""


@dataclasses.dataclass
class TeacherLogprobs:
    """`logp [R]` float32: log π(response[i] | prompt ⊕ response[:i]).
    `topk_logp [R, K]` float32 / `topk_ids [R, K]` int32: the K most likely tokens at each
    response position (largest first), or None when `top_k = 0`."""
    logp: np.ndarray
    topk_logp: np.ndarray | None = None
    topk_ids: np.ndarray | None = None
    weight_version: str | None = None


def teacher_request(prompt_ids: Sequence[int], response_ids: Sequence[int],
                    top_k: int = 0) -> dict:
    """The `/generate` body that scores `response_ids` after `prompt_ids`."""
    prompt, response = [int(t) for t in prompt_ids], [int(t) for t in response_ids]
    if not prompt:
        raise ValueError("prompt_ids is empty, expected at least 1 token (the first token of a "
                         "sequence is never scored)")
    if not response:
        raise ValueError("response_ids is empty, expected at least 1 token to score")
    if top_k < 0:
        raise ValueError(f"top_k = {top_k}, expected >= 0")
    body: dict[str, Any] = {
        "input_ids": prompt + response,
        "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
        "return_logprob": True,
        "logprob_start_len": len(prompt) - 1,
    }
    if top_k:
        body["top_logprobs_num"] = top_k
    return body


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TeacherLogprobError(f"{where} = {value!r}, expected a finite log-prob")
    return float(value)


def _token_id(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise TeacherLogprobError(f"{where} = {value!r}, expected a token id (an integer >= 0)")
    return int(value)


def _entry(value: Any, where: str) -> tuple[Any, Any]:
    """`(logprob, token_id)` of one `(logprob, token_id, text)` entry, unchecked values."""
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise TeacherLogprobError(f"{where} = {value!r}, expected (logprob, token_id, text)")
    return value[0], value[1]


def parse_teacher_response(resp: dict, prompt_ids: Sequence[int], response_ids: Sequence[int],
                           top_k: int = 0) -> TeacherLogprobs:
    """Checks and converts a `/generate` answer to `teacher_request(...)`. Any answer that is
    not exactly the expected shape (a non-object answer, entries that are not
    `(logprob, token_id, text)` lists, non-integer ids, non-finite log-probs, wrong lengths or
    widths) raises `TeacherLogprobError` naming the entry, its value and what was expected;
    no other exception escapes for a malformed answer."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty, expected at least 1 token")
    meta = resp.get("meta_info") if isinstance(resp, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("input_token_logprobs"), list):
        got = sorted(map(str, meta if isinstance(meta, dict) else resp)) \
            if isinstance(resp, dict) else type(resp).__name__
        raise TeacherLogprobError(f"answer has no meta_info.input_token_logprobs (got "
                                  f"{'keys ' if isinstance(resp, dict) else 'a '}{got})")
    entries = meta["input_token_logprobs"]
    r = len(response_ids)
    if len(entries) != r + 1:
        raise TeacherLogprobError(
            f"meta_info.input_token_logprobs has {len(entries)} entries, expected "
            f"len(response_ids) + 1 = {r + 1} (logprob_start_len = len(prompt) - 1)")
    if entries[0] is not None:
        _, first = _entry(entries[0], "input_token_logprobs[0]")
        if _token_id(first, "input_token_logprobs[0].token_id") != prompt_ids[-1]:
            raise TeacherLogprobError(f"input_token_logprobs[0] is about token {first}, "
                                      f"expected the last prompt token {prompt_ids[-1]}")
    logp = np.empty((r,), np.float32)
    for i, (entry, want) in enumerate(zip(entries[1:], response_ids)):
        where = f"input_token_logprobs[{i + 1}]"
        value, token = _entry(entry, where)
        if _token_id(token, f"{where}.token_id") != want:
            raise TeacherLogprobError(f"{where} is about token {token}, expected "
                                      f"response_ids[{i}] = {want} (misaligned)")
        logp[i] = _finite(value, f"{where}.logprob")
    out = TeacherLogprobs(logp=logp, weight_version=meta.get("weight_version"))
    if top_k:
        tops = meta.get("input_top_logprobs")
        if not isinstance(tops, list) or len(tops) != r + 1:
            raise TeacherLogprobError(
                f"meta_info.input_top_logprobs has "
                f"{len(tops) if isinstance(tops, list) else tops!r} entries, expected {r + 1}")
        out.topk_logp = np.empty((r, top_k), np.float32)
        out.topk_ids = np.empty((r, top_k), np.int32)
        for i, top in enumerate(tops[1:]):
            if not isinstance(top, list) or len(top) != top_k:
                raise TeacherLogprobError(
                    f"input_top_logprobs[{i + 1}] has "
                    f"{len(top) if isinstance(top, list) else top!r} entries, expected "
                    f"top_k = {top_k}")
            for j, entry in enumerate(top):
                where = f"input_top_logprobs[{i + 1}][{j}]"
                value, token = _entry(entry, where)
                out.topk_logp[i, j] = _finite(value, f"{where}.logprob")
                out.topk_ids[i, j] = _token_id(token, f"{where}.token_id")
    return out
