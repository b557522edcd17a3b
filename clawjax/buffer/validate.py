"""Checks a pushed wire sample against the data contract and the buffer's size limits.

`Sample.validate()` supplies the contract rules; this adds what only the wire and the store
care about (serialized size, id length, a top-K payload that reshapes to `[response_len, K]`).
Every failure is a `SampleError` naming sample id, field, value and expectation.
"""

from __future__ import annotations

import dataclasses

from clawjax.buffer import codec, decode
from clawjax.buffer import rollout_pb2 as pb
from clawjax.sample import MAX_TOKENS, Sample, SampleError

MAX_ID_BYTES = 1024


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
