"""A request inside the engine (`Request`: what was asked, plus the engine's running state for
it) and the SGLang `/generate` response built from it (`result_of`).

Response rules (SGLang's detokenizer): a matched stop token id (or EOS) ends `output_ids` but
not `text`, and a matched stop string is cut from `text` (`trim_text_at`), unless
`no_stop_trim`. Log-prob entries are `[logprob, token_id, token_text or None]` triples; input
entries cover prompt positions `len(prompt) - len(input_logp) .. len(prompt) - 1`.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Callable

import numpy as np

from clawjax.serving.sampling_params import SamplingParams


@dataclasses.dataclass(eq=False)
class Request:
    """A request inside the engine. `on_done(result)` and `on_token(partial)` are called from
    the engine thread; `result` is the SGLang `/generate` response dict."""
    prompt: list[int]
    params: SamplingParams
    on_done: Callable[[dict], None]
    rid: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    on_token: Callable[[dict], None] | None = None
    # --- engine state ---
    slot: int = -1
    gen: int = -1  # the engine's weight generation this request runs on
    version: str = ""  # its weight_version label
    output_ids: list[int] = dataclasses.field(default_factory=list)
    output_logp: list[float] = dataclasses.field(default_factory=list)
    output_top: list[list[tuple[float, int]]] = dataclasses.field(default_factory=list)
    input_logp: list[float | None] = dataclasses.field(default_factory=list)
    input_top: list[list[tuple[float, int]] | None] = dataclasses.field(default_factory=list)
    finish: dict | None = None
    trim_text_at: int | None = None
    min_text: str | None = None  # text of the first `min_new_tokens` tokens (no stop ends in it)
    aborted: str | None = None
    rng: np.random.Generator | None = None
    t_start: float = dataclasses.field(default_factory=time.monotonic)


def result_of(r: Request, finish: dict | None,
              detokenize: Callable[[list[int], bool], str] | None,
              weight_version: str) -> dict:
    """The SGLang `/generate` response for `r` so far (`finish=None` while streaming).
    `detokenize` None: no text (""), no token texts; `weight_version` labels a request that
    has none yet (not admitted)."""
    def text_of(ids: list[int], skip_special: bool) -> str | None:
        return None if detokenize is None else detokenize(ids, skip_special)

    def triple(lp: float | None, tok: int, with_text: bool) -> list:
        return [lp, tok, text_of([tok], False) if with_text else None]

    ids = r.output_ids
    if finish is not None and finish.get("type") == "stop" and \
            isinstance(finish.get("matched"), int) and not r.params.no_stop_trim:
        ids = ids[:-1]  # SGLang: a matched stop token id stays in output_ids, not in text
    text = text_of(ids, r.params.skip_special_tokens) or ""
    if r.trim_text_at is not None:
        text = text[:r.trim_text_at]
    meta: dict[str, Any] = {
        "id": r.rid, "finish_reason": finish, "prompt_tokens": len(r.prompt),
        "completion_tokens": len(r.output_ids), "cached_tokens": 0,
        "weight_version": r.version or weight_version,
        "e2e_latency": time.monotonic() - r.t_start,
    }
    if r.return_logprob:
        wt = r.return_text_in_logprobs and detokenize is not None
        s = len(r.prompt) - len(r.input_logp)
        meta["input_token_logprobs"] = [triple(lp, r.prompt[s + i], wt)
                                        for i, lp in enumerate(r.input_logp)]
        meta["output_token_logprobs"] = [triple(lp, t, wt)
                                         for lp, t in zip(r.output_logp, r.output_ids)]
        if r.top_logprobs_num:
            meta["input_top_logprobs"] = [
                None if top is None else [triple(lp, t, wt) for lp, t in top]
                for top in r.input_top]
            meta["output_top_logprobs"] = [[triple(lp, t, wt) for lp, t in top]
                                           for top in r.output_top]
    return {"text": text, "output_ids": list(r.output_ids), "meta_info": meta}
