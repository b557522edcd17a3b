"""Field validation shared by every endpoint's request parser: `ProtocolError` and the checks
of one JSON value (integer, number, boolean, UTF-8 text, stop strings, token ids, request id,
unknown keys).

Every check raises `ProtocolError(field, value, expected)`, which the server turns into a 400
whose message names the field (dotted path), the value and what was expected. `prefix` is the
dotted path of the object the key lives in (`"sampling_params."`, `""` at the top level).

Unknown fields: a field we do not implement is accepted only when its value is "off" (None,
False, 0, "", [] or {}), so SGLang clients that send defaults keep working while a request that
relies on a feature we lack is refused instead of silently ignored.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from clawjax.error_text import shown_value

# Sampling parameters we do not implement (SGLang names), accepted at their neutral values.
NEUTRAL = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
           "n": 1}


class ProtocolError(ValueError):
    """A request breaks the API: names the field, the value and what was expected."""

    def __init__(self, field: str, value: Any, expected: str):
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"field {field!r} = {shown_value(value)}, expected {expected}")


def is_off(value: Any) -> bool:
    """Whether `value` asks for nothing (None, False, 0, "", [] or {})."""
    return value is None or value is False or value == 0 or value in ("", [], {})


def check_keys(body: Mapping[str, Any], known: set[str], prefix: str) -> None:
    """Refuses a key of `body` outside `known` unless it is off (`NEUTRAL` keys: at their
    neutral value)."""
    for key, value in body.items():
        if key in known:
            continue
        if key in NEUTRAL:
            if value is not None and value != NEUTRAL[key]:
                raise ProtocolError(prefix + key, value, f"{NEUTRAL[key]!r} (not supported)")
            continue
        if not is_off(value):
            raise ProtocolError(prefix + key, value,
                                "a supported field (this server does not implement it)")


def int_field(body, key, prefix, default, lo=None, hi=None):
    """`body[key]` as an integer in [lo, hi] (bounds optional); `default` when absent/null."""
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


def float_field(body, key, prefix, default, lo=None, hi=None):
    """`body[key]` as a finite float in [lo, hi]; `default` when absent/null."""
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(prefix + key, value, "a finite number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ProtocolError(prefix + key, value, f"a number in [{lo}, {hi}]")
    return float(value)


def bool_field(body, key, prefix, default):
    """`body[key]` as a JSON boolean; `default` when absent/null."""
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ProtocolError(prefix + key, value, "true or false")
    return value


# Bounds on the stop conditions of one request. The single engine thread checks every stop
# string against the output text and every stop token id against each new token at every
# decode step of every batched request, so an unbounded list (200,000 strings fit in a 5 MB
# body) stalls all the requests it shares the engine with. OpenAI allows at most 4 stop
# sequences and SGLang documents no bound; these leave real clients (a few markers such as
# "</tool_call>" or "\nObservation:", a tokenizer's special token ids) ample room.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 256   # per stop string
MAX_STOP_TOKEN_IDS = 1024


def utf8_text(text: str, field: str) -> str:
    """`text` when it has a UTF-8 encoding, else a ProtocolError naming `field`: JSON may carry
    a lone surrogate ("\\ud800"), which no tokenizer (and no UTF-8 wire) takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ProtocolError(field, text, f"text encodable as UTF-8 (it has the lone surrogate "
                            f"{text[e.start]!r} at index {e.start})") from None
    return text


def stop_list(value, field) -> list[str]:
    """A stop string or list of them → a list of non-empty strings (None: []): at most
    MAX_STOP_STRINGS strings of at most MAX_STOP_CHARS characters each."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise ProtocolError(field, value, "a non-empty string or a list of non-empty strings")
    if len(value) > MAX_STOP_STRINGS:
        raise ProtocolError(field, f"<{len(value)} strings>",
                            f"at most {MAX_STOP_STRINGS} stop strings")
    for i, s in enumerate(value):
        if len(s) > MAX_STOP_CHARS:
            raise ProtocolError(f"{field}[{i}]", s,
                                f"a stop string of at most {MAX_STOP_CHARS} characters "
                                f"(it has {len(s)})")
    return list(value)


def id_list(value, field, vocab_size: int, most: int | None = None) -> list[int]:
    """A list of token ids, each in [0, vocab_size) (None: []); an error names the index. At
    most `most` ids when given (prompts, `input_ids`, are bounded by the context instead)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ProtocolError(field, value, "a list of token ids")
    if most is not None and len(value) > most:
        raise ProtocolError(field, f"<{len(value)} token ids>", f"at most {most} token ids")
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ProtocolError(f"{field}[{i}]", t, f"a token id in [0, {vocab_size})")
    return list(value)


def rid_field(body: Mapping) -> str | None:
    """The request id a client chose (SGLang `rid`), None when absent."""
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, str):
        raise ProtocolError("rid", rid, "a string")
    return rid
