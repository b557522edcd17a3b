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


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def varint(n: int) -> bytes:
    """Base-128 varint of a non-negative int."""
    if n < 0x80:
        return _ONE_BYTE[n]
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(field: int, payload_len: int) -> bytes:
    """Header of a length-delimited record (wire type 2) of `field`: tag, then length."""
    return varint(field << 3 | 2) + varint(payload_len)


def _le(values, dtype: str) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, dtype=dtype).reshape(-1))


def sample_parts(sample: Sample) -> list:
    """Serialized `rollout.Sample` for `sample` as a list of buffers to concatenate (array data
    is referenced, not copied). Parses to the same message as `codec.to_proto(sample)`, and
    refuses what it refuses (`SampleError`)."""
    parts = [codec.scalars_to_proto(sample, pb.Sample()).SerializeToString()]

    def packed(field: int, arr: np.ndarray) -> None:
        parts.extend((_ld(field, arr.nbytes), memoryview(arr).cast("B")))

    for field, arr, dtype in ((6, sample.tokens, "<i4"), (8, sample.loss_mask, "<f4"),
                              (9, sample.rollout_logp, "<f4")):
        if arr is not None and np.size(arr):
            packed(field, _le(arr, dtype))
    for field, arr in ((11, sample.step_rewards), (12, sample.teacher_logp)):
        if arr is None:
            continue
        arr = _le(arr, "<f4")
        if arr.size:  # FloatArray{values = 1}
            inner = _ld(1, arr.nbytes)
            parts.append(_ld(field, len(inner) + arr.nbytes))
            packed(1, arr)
        else:
            parts.append(_ld(field, 0))
    if sample.teacher_topk_logp is not None or sample.teacher_topk_ids is not None:
        logp, ids = codec.checked_topk(sample)   # refuses one without the other, as to_proto
        k = varint(1 << 3) + varint(int(logp.shape[1]))
        if logp.size:  # TopK{k = 1, logp = 2, ids = 3}
            logp, ids = _le(logp, "<f4"), _le(ids, "<i4")
            h2, h3 = _ld(2, logp.nbytes), _ld(3, ids.nbytes)
            size = len(k) + len(h2) + logp.nbytes + len(h3) + ids.nbytes
            parts.extend((_ld(13, size), k, h2, memoryview(logp).cast("B"), h3,
                          memoryview(ids).cast("B")))
        else:
            parts.extend((_ld(13, len(k)), k))
    return parts


def encode_sample(sample: Sample) -> bytes:
    """Serialized `rollout.Sample` for `sample` (same message as `codec.to_proto`, faster)."""
    return b"".join(sample_parts(sample))


def encode_push_request(samples) -> bytes:
    """Serialized `PushRequest` (one copy of the array data)."""
    parts = []
    for sample in samples:
        sp = sample_parts(sample)
        parts += [b"\x0a", varint(sum(len(p) for p in sp))]  # PushRequest.samples = 1
        parts += sp
    return b"".join(parts)


def join_repeated(items: list[bytes], field: int = 1) -> bytes:
    """A message whose `field` is `repeated bytes/message` holding `items` (e.g. a
    PushRequest or LeaseResponse from serialized samples)."""
    tag, parts = varint(field << 3 | 2), []
    for x in items:
        parts += (tag, varint(len(x)), x)
    return b"".join(parts)


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
