"""Protobuf wire-format helpers for the hot path: encode a `Sample` straight from numpy arrays,
and split / join `repeated Sample samples = 1` payloads without parsing the samples.

Packed repeated fields are one length-delimited record each (`tag | length | payload`), and a
message is the concatenation of its fields in any order, so a sample's bytes are its scalar
fields (serialized by protobuf) followed by its arrays encoded here with numpy. The result
parses to the same message as `codec.to_proto(sample)` (tests/test_buffer_proto.py checks it).
"""

from __future__ import annotations

import numpy as np

from clawjax.buffer import codec
from clawjax.buffer import rollout_pb2 as pb
from clawjax.sample import Sample


def varint(n: int) -> bytes:
    """Base-128 varint of a non-negative int."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    """A length-delimited record (wire type 2) of `field`."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def packed_int32(values: np.ndarray) -> bytes:
    """Payload of a packed `sfixed32` field (token ids): little-endian int32."""
    return np.asarray(values, dtype="<i4").reshape(-1).tobytes()


def packed_floats(values: np.ndarray) -> bytes:
    return np.asarray(values, dtype="<f4").reshape(-1).tobytes()


def encode_sample(sample: Sample) -> bytes:
    """Serialized `rollout.Sample` for `sample` (same message as `codec.to_proto`, faster)."""
    head = codec.scalars_to_proto(sample, pb.Sample()).SerializeToString()
    parts = [head]
    for field, arr, ints in ((6, sample.tokens, True), (8, sample.loss_mask, False),
                             (9, sample.rollout_logp, False)):
        if arr is not None and np.size(arr):
            parts.append(_ld(field, packed_int32(arr) if ints else packed_floats(arr)))
    for field, arr in ((11, sample.step_rewards), (12, sample.teacher_logp)):
        if arr is not None:
            parts.append(_ld(field, _ld(1, packed_floats(arr)) if np.size(arr) else b""))
    if sample.teacher_topk_logp is not None:
        logp, ids = codec.checked_topk(sample)
        inner = varint(1 << 3) + varint(int(logp.shape[1]))
        if logp.size:
            inner += _ld(2, packed_floats(logp)) + _ld(3, packed_int32(ids))
        parts.append(_ld(13, inner))
    return b"".join(parts)


def join_repeated(items: list[bytes], field: int = 1) -> bytes:
    """A message whose `field` is `repeated bytes/message` holding `items` (e.g. a
    PushRequest or LeaseResponse from serialized samples)."""
    tag = varint(field << 3 | 2)
    return b"".join(tag + varint(len(x)) + x for x in items)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def split_repeated(data: bytes, field: int = 1) -> list[memoryview]:
    """The payloads of `field` (length-delimited) in a serialized message, in order, as
    zero-copy views into `data`; raises ValueError on malformed input or on any other field."""
    out, pos, want = [], 0, field << 3 | 2
    view = memoryview(data)
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        if tag != want:
            raise ValueError(f"unexpected field tag {tag} at offset {pos}, expected {want}")
        n, pos = _read_varint(data, pos)
        if pos + n > len(data):
            raise ValueError(f"truncated field at offset {pos}: {n} bytes announced")
        out.append(view[pos:pos + n])
        pos += n
    return out
