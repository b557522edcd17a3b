"""Checks a pushed wire sample against the data contract and the buffer's size limits.

`Sample.validate()` supplies the contract rules; this adds what only the wire and the store
care about (serialized size, id length, a top-K payload that reshapes to `[response_len, K]`).
Every failure is a `SampleError` naming sample id, field, value and expectation.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from clawjax.buffer import codec, decode
from clawjax.buffer import rollout_pb2 as pb
from clawjax.sample import FLOAT32_MAX, KINDS, LOGP_FLOOR, MAX_TOKENS, Sample, SampleError

MAX_ID_BYTES = 1024
MAX_LEASE_SAMPLES = 100_000  # the most samples a Lease (or a Stream's max_in_flight) asks for
MAX_WAIT_S = 300.0  # the longest a Lease waits for its first sample


def lease_wait_s(timeout_s: float) -> float:
    """The seconds a Lease asking `timeout_s` waits, as the server reads it (the client sends
    the same): a negative wait is none, a longer one `MAX_WAIT_S`."""
    return min(max(timeout_s, 0.0), MAX_WAIT_S)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-sample limits: serialized bytes, token count, id length (utf-8 bytes)."""
    max_sample_bytes: int = 16 << 20
    max_tokens: int = MAX_TOKENS
    max_id_bytes: int = MAX_ID_BYTES


def check(msg: pb.Sample, limits: Limits = Limits(), size: int | None = None) -> Sample:
    """Returns the host `Sample` for a valid wire sample; raises `SampleError` otherwise.
    `size` is the serialized size when the caller has it (else computed)."""
    size = msg.ByteSize() if size is None else size
    _check_limits(msg.sample_id, size, len(msg.tokens), limits)
    sample = codec.from_proto(msg)
    return sample.validate(max_tokens=limits.max_tokens)


def check_bytes(data, limits: Limits = Limits()) -> Sample:
    """`check` on a serialized Sample, decoded without a protobuf parse of its arrays: the
    returned sample's arrays may be read-only views of `data`. Raises `DecodeError` for bytes
    that are not a Sample message, then the same `SampleError`s as `check`, in the same order.
    Samples below `decode.FAST_MIN_BYTES` go through `check` (protobuf is faster there)."""
    if len(data) < decode.FAST_MIN_BYTES:
        return check(pb.Sample.FromString(data), limits, size=len(data))
    parsed = decode.parse(data, copy=False)
    _check_limits(parsed.msg.sample_id, len(data), parsed.num_tokens, limits)
    return decode.to_sample(parsed).validate(max_tokens=limits.max_tokens)


def check_wire(data, limits: Limits = Limits()) -> tuple[str, int]:
    """(sample_id, policy_version) of a serialized Sample that passes `check_bytes`, with the
    same `DecodeError` / `SampleError` otherwise. The server's hot path: a sample of the usual
    shape, of any size, is checked straight on the parsed arrays (`_surely_valid`, a few
    reductions and no `Sample`: 19-22 µs from 0.7 to 80 KiB, vs 25-29 µs for `check_bytes`
    below `decode.FAST_MIN_BYTES`); anything that predicate does not clear goes through
    `check_bytes`, so errors and edge cases are exactly `Sample.validate()`'s."""
    parsed = decode.parse(data, copy=False)
    if _surely_valid(parsed, len(data), limits):
        return parsed.msg.sample_id, parsed.msg.policy_version
    sample = check_bytes(data, limits)
    return sample.sample_id, sample.policy_version


def _logp_ok(a: np.ndarray, n: int) -> bool:
    """n entries, all in [LOGP_FLOOR, 0] (max ≤ 0 rules out NaN, +inf and positives; the
    floor, -inf)."""
    return a.shape[0] == n and bool(a.max() <= 0) and bool(a.min() >= LOGP_FLOOR)


def _surely_valid(p: decode.Parsed, size: int, limits: Limits) -> bool:
    """True only if the parsed sample passes every rule of `check_bytes` (limits, then
    `Sample.validate`); False means "not sure" (the caller re-checks the slow way). Samples
    with top-K arrays or step rewards always take the slow way (rare, and more rules)."""
    msg, a = p.msg, p.arrays
    sid, r = msg.sample_id, msg.response_len
    tokens, mask, logp = a.get(6), a.get(8), a.get(9)
    if (not sid or size > limits.max_sample_bytes or msg.kind not in KINDS
            or tokens is None or mask is None or logp is None or 13 in p.present
            or 11 in p.present or len(sid.encode()) > limits.max_id_bytes):
        return False
    n = tokens.shape[0]
    if n > limits.max_tokens or not 1 <= r <= n - 1 or int(tokens.min()) < 0:
        return False
    if mask.shape[0] != r or np.count_nonzero(mask == 0) + np.count_nonzero(mask == 1) != r:
        return False  # an entry that is neither 0 nor 1 (NaN included)
    if not _logp_ok(logp, r) or not abs(msg.reward) <= FLOAT32_MAX:   # NaN, ±inf included
        return False
    if msg.kind == "opd" and msg.reward != 0:   # an OPD-only sample carries no reward
        return False
    if (12 in p.present) != (msg.kind in ("opd", "both")):
        return False
    return 12 not in p.present or _logp_ok(a[12], r)


def _check_limits(sid: str, size: int, num_tokens: int, limits: Limits) -> None:
    if size > limits.max_sample_bytes:
        raise SampleError(sid, "sample (serialized size)", f"{size} bytes",
                          f"at most max_sample_bytes = {limits.max_sample_bytes}")
    if len(sid.encode()) > limits.max_id_bytes:
        raise SampleError(sid[:64], "sample_id", f"{len(sid.encode())} bytes",
                          f"at most {limits.max_id_bytes} bytes")
    if num_tokens > limits.max_tokens:  # before decoding a huge array
        raise SampleError(sid, "tokens", f"length {num_tokens}",
                          f"at most {limits.max_tokens} tokens")
