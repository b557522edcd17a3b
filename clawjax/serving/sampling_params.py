"""SGLang's `sampling_params`: the dataclass the engine samples with and its validation from a
request body (native `sampling_params`, or the same keys of an OpenAI body under aliases)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from clawjax.serving.fields import (MAX_STOP_TOKEN_IDS, ProtocolError, bool_field, check_keys,
                                    float_field, id_list, int_field, stop_list)

GENERATE_MAX_NEW_TOKENS = 128  # SGLang's `SamplingParams.max_new_tokens` default (/generate)


@dataclasses.dataclass
class SamplingParams:
    """SGLang `sampling_params`. `top_k = -1` and `top_p = 1` mean no truncation; `temperature
    < 1e-6` is greedy (SGLang's sampling eps). `stop` strings need a tokenizer; `stop_token_ids`
    do not. While fewer than `min_new_tokens` are out, stop/EOS ids cannot be drawn."""
    max_new_tokens: int = GENERATE_MAX_NEW_TOKENS
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


def check_min_new_tokens(params: SamplingParams, min_field: str, max_field: str,
                         defaulted: str | None = None) -> None:
    """Refuses `min_new_tokens > max_new_tokens`, as SGLang does ("min_new_tokens must be in
    [0, max_new_tokens]"): generation would end at `max_new_tokens`, short of the minimum.
    Call it once `max_new_tokens` is settled. `min_field` / `max_field` name the request's
    fields; `defaulted` is None when the request set `max_field`, else how its default came
    about, e.g. "min(128, the context length 256 minus the 3 prompt tokens)" (the message
    names both values either way)."""
    lo, hi = params.min_new_tokens, params.max_new_tokens
    if lo <= hi:
        return
    if defaulted is None:
        why = f"at most {max_field!r} = {hi}"
    else:
        why = f"at most the output length: {max_field!r} is not set, so it is {hi} = {defaulted}"
    raise ProtocolError(min_field, lo, f"an integer in [0, {hi}] ({why})")


def parse_sampling_params(body: Any, vocab_size: int, prefix: str = "sampling_params.",
                          aliases: Mapping[str, str] | None = None) -> SamplingParams:
    """Validates a SGLang `sampling_params` dict (or the same keys of an OpenAI body when
    `aliases` maps OpenAI names such as `max_tokens` onto ours). `min_new_tokens` above a
    `max_new_tokens` the body sets is refused here (naming the field it came from); when the
    body sets none, the server settles the default once the prompt is known and checks it
    then (`check_min_new_tokens`)."""
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        raise ProtocolError(prefix.rstrip("."), body, "a JSON object")
    body = dict(body)
    source: dict[str, str] = {}  # our name -> the alias it was set under
    for theirs, ours in (aliases or {}).items():
        if body.get(theirs) is not None:
            body[ours] = body.pop(theirs)
            source[ours] = theirs
        else:
            body.pop(theirs, None)
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    check_keys(body, fields, prefix)
    p = SamplingParams(
        max_new_tokens=int_field(body, "max_new_tokens", prefix, GENERATE_MAX_NEW_TOKENS, lo=0),
        temperature=float_field(body, "temperature", prefix, 1.0, lo=0.0, hi=100.0),
        top_p=float_field(body, "top_p", prefix, 1.0, lo=0.0, hi=1.0),
        top_k=int_field(body, "top_k", prefix, -1, lo=-1),
        min_p=float_field(body, "min_p", prefix, 0.0, lo=0.0, hi=1.0),
        stop=stop_list(body.get("stop"), prefix + "stop"),
        stop_token_ids=id_list(body.get("stop_token_ids"), prefix + "stop_token_ids",
                               vocab_size, most=MAX_STOP_TOKEN_IDS),
        ignore_eos=bool_field(body, "ignore_eos", prefix, False),
        skip_special_tokens=bool_field(body, "skip_special_tokens", prefix, True),
        no_stop_trim=bool_field(body, "no_stop_trim", prefix, False),
        min_new_tokens=int_field(body, "min_new_tokens", prefix, 0, lo=0),
        sampling_seed=int_field(body, "sampling_seed", prefix, None, lo=0),
    )
    if p.top_p == 0.0:
        raise ProtocolError(prefix + "top_p", 0.0, "a number in (0, 1]")
    if p.top_k == 0:
        raise ProtocolError(prefix + "top_k", 0, "-1 (off) or an integer >= 1")
    if body.get("max_new_tokens") is not None:
        check_min_new_tokens(p, prefix + "min_new_tokens",
                             prefix + source.get("max_new_tokens", "max_new_tokens"))
    return p
