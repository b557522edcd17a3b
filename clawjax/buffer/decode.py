"""Decoding a serialized `rollout.Sample` straight into numpy, without a protobuf parse of its
arrays (the hot path of Push on the server and of Lease/Stream on the client).

A sample's bytes are its fields in any order; the large ones are the packed arrays
(`tokens` 6, `loss_mask` 8, `rollout_logp` 9) and the sub-messages holding arrays
(`step_rewards` 11, `teacher_logp` 12, `teacher_topk` 13). `parse` walks the top level once,
takes each array as a numpy view of its bytes (little-endian int32 / float32; no per-element
work) and hands every other field (ids, counters, reward, kind, metadata, unknown fields) to
protobuf, which parses that small remainder with its usual checks (UTF-8, map entries).

Anything the fast walk does not recognise as the plain encoding this package writes (an array
field that repeats or is not packed, a sub-message field other than the expected ones, groups,
malformed bytes) falls back to `pb.Sample.FromString` + `codec` on the whole message, so the
result — and any `DecodeError` — is always what the protobuf parse gives
(tests/test_buffer_decode.py compares both on valid, unusual and malformed inputs).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from google.protobuf.message import DecodeError

from clawjax.buffer import codec
from clawjax.buffer import rollout_pb2 as pb
from clawjax.sample import Sample, SampleError

# Below this serialized size the protobuf parse (C, no Python walk) is as fast or faster;
# above it, its per-array allocations dominate (measured: 2x-4x slower at 80 KiB).
FAST_MIN_BYTES = 32 << 10

_PACKED = {6: "<i4", 8: "<f4", 9: "<f4"}     # Sample fields: packed fixed-width arrays
_FLOAT_ARRAY = (11, 12)                       # FloatArray{repeated float values = 1}
_TOPK = 13                                    # TopK{uint32 k = 1; float logp = 2; int32 ids = 3}


class _Unusual(Exception):
    """The fast walk met an encoding it leaves to protobuf."""


@dataclasses.dataclass
class Parsed:
    """A parsed wire sample: `msg` holds every non-array field (array fields empty/unset);
    `arrays` maps field number → 1-D numpy array (views of the input unless copied);
    `present` holds the sub-message fields (11, 12, 13) that were set; `topk_k` is TopK.k."""
    msg: pb.Sample
    arrays: dict[int, np.ndarray]
    present: frozenset[int]
    topk_k: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.arrays[6].shape[0]) if 6 in self.arrays else 0


def _varint(data, pos: int, end: int) -> tuple[int, int]:
    if pos < end and data[pos] < 0x80:  # one byte: tags, small lengths and counters
        return data[pos], pos + 1
    result = shift = 0
    while True:
        if pos >= end:
            raise _Unusual("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Unusual("varint too long")


def _fields(data, pos: int, end: int):
    """Yields (field, wire_type, start of the field's record, payload start, payload end) for
    every field in data[pos:end]; varint/fixed payloads span their encoded bytes."""
    while pos < end:
        start = pos
        tag = data[pos]  # one-byte tags (fields 1-15) inline; longer ones via _varint
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _varint(data, pos, end)
        field, wtype = tag >> 3, tag & 7
        if field == 0:
            raise _Unusual("field number 0")
        if wtype == 2:
            if pos < end and data[pos] < 0x80:
                stop = pos + 1 + data[pos]
                pos += 1
            else:
                n, pos = _varint(data, pos, end)
                stop = pos + n
        elif wtype == 0:
            _, stop = _varint(data, pos, end)
        elif wtype == 1:
            stop = pos + 8
        elif wtype == 5:
            stop = pos + 4
        else:  # groups
            raise _Unusual(f"wire type {wtype}")
        if stop > end:
            raise _Unusual("truncated field")
        yield field, wtype, start, pos, stop
        pos = stop


def _array(buf: memoryview, dtype: str, start: int, stop: int, copy: bool) -> np.ndarray:
    if (stop - start) % 4:
        raise _Unusual("packed fixed-width payload not a multiple of 4 bytes")
    arr = np.frombuffer(buf[start:stop], dtype=dtype)
    return arr.astype(dtype[1:], copy=True) if copy else arr


def _fast(data, copy: bool) -> Parsed:
    buf = memoryview(data).cast("B")
    rest, arrays, present, k = [], {}, set(), 0
    run_start = run_stop = 0  # the current run of contiguous non-array records
    for field, wtype, rec, start, stop in _fields(buf, 0, len(buf)):
        if field in _PACKED or field in _FLOAT_ARRAY or field == _TOPK:
            if wtype != 2 or field in arrays or field in present:
                raise _Unusual(f"field {field} repeated or not packed")
        else:
            if rec != run_stop:
                if run_stop > run_start:
                    rest.append(buf[run_start:run_stop])
                run_start = rec
            run_stop = stop
            continue
        if field in _PACKED:
            arrays[field] = _array(buf, _PACKED[field], start, stop, copy)
            continue
        present.add(field)
        inner: dict[int, np.ndarray] = {}
        for f, wt, _, s, e in _fields(buf, start, stop):
            if f in inner:
                raise _Unusual(f"field {field}.{f} repeated")
            if field in _FLOAT_ARRAY and f == 1 and wt == 2:
                inner[f] = _array(buf, "<f4", s, e, copy)
            elif field == _TOPK and f in (2, 3) and wt == 2:
                inner[f] = _array(buf, "<f4" if f == 2 else "<i4", s, e, copy)
            elif field == _TOPK and f == 1 and wt == 0:
                k, _ = _varint(buf, s, e)
                if k >= 1 << 32:
                    raise _Unusual("k beyond uint32")
                inner[f] = np.empty(0)  # marks k as seen
            else:
                raise _Unusual(f"field {field}.{f} unexpected")
        if field == _TOPK:
            arrays[-2] = inner.get(2, np.empty(0, np.float32))
            arrays[-3] = inner.get(3, np.empty(0, np.int32))
        else:
            arrays[field] = inner.get(1, np.empty(0, np.float32))
    if run_stop > run_start:
        rest.append(buf[run_start:run_stop])
    try:
        msg = pb.Sample.FromString(rest[0] if len(rest) == 1 else b"".join(rest))
    except DecodeError as e:  # let the whole-message parse report it
        raise _Unusual(str(e)) from e
    return Parsed(msg, arrays, frozenset(present), k)


def _slow(data) -> Parsed:
    """The protobuf parse (raises `DecodeError` on malformed input)."""
    msg = pb.Sample.FromString(bytes(data))
    arrays = {6: codec._ints(msg.tokens), 8: codec._floats(msg.loss_mask),
              9: codec._floats(msg.rollout_logp)}
    present = set()
    for field, name in ((11, "step_rewards"), (12, "teacher_logp")):
        if msg.HasField(name):
            present.add(field)
            arrays[field] = codec._floats(getattr(msg, name).values)
    k = 0
    if msg.HasField("teacher_topk"):
        present.add(_TOPK)
        k = msg.teacher_topk.k
        arrays[-2] = codec._floats(msg.teacher_topk.logp)
        arrays[-3] = codec._ints(msg.teacher_topk.ids)
    for name in ("tokens", "loss_mask", "rollout_logp", "step_rewards", "teacher_logp",
                 "teacher_topk"):
        msg.ClearField(name)
    return Parsed(msg, arrays, frozenset(present), k)


def parse(data, copy: bool = False) -> Parsed:
    """Parses one serialized Sample. `copy=False` leaves the arrays as read-only views of
    `data` (keep `data` alive and unchanged while they are used); `copy=True` gives owned,
    writable arrays. Raises `google.protobuf.message.DecodeError` on malformed bytes."""
    try:
        return _fast(data, copy)
    except _Unusual:
        return _slow(data)


def to_sample(p: Parsed) -> Sample:
    """The host `Sample` of a parsed wire sample (not validated); same as `codec.from_proto`,
    including its `SampleError` for a top-K payload that does not reshape to `[?, K]`."""
    msg, a = p.msg, p.arrays
    empty_f = np.empty(0, np.float32)
    topk_logp = topk_ids = None
    if _TOPK in p.present:
        k, n, n_ids = p.topk_k, int(a[-2].shape[0]), int(a[-3].shape[0])
        if k == 0 or n != n_ids or n % k:
            raise SampleError(msg.sample_id, "teacher_topk",
                              f"k={k}, len(logp)={n}, len(ids)={n_ids}",
                              "k ≥ 1 and both arrays of length response_len * k")
        topk_logp, topk_ids = a[-2].reshape(n // k, k), a[-3].reshape(n // k, k)
    return Sample(
        sample_id=msg.sample_id,
        tokens=a.get(6, np.empty(0, np.int32)),
        response_len=msg.response_len,
        loss_mask=a.get(8, empty_f),
        rollout_logp=a.get(9, empty_f),
        reward=msg.reward,
        kind=msg.kind,
        session_id=msg.session_id,
        turn_index=msg.turn_index,
        policy_version=msg.policy_version,
        created_unix_ms=msg.created_unix_ms,
        step_rewards=a[11] if 11 in p.present else None,
        teacher_logp=a[12] if 12 in p.present else None,
        teacher_topk_logp=topk_logp,
        teacher_topk_ids=topk_ids,
        metadata=dict(msg.metadata),
    )


def decode_sample(data, copy: bool = True) -> Sample:
    """Serialized Sample → host `Sample` (not validated). Samples of at least
    `FAST_MIN_BYTES` take the fast walk (`parse`; `copy=False` gives read-only views of
    `data`); smaller ones the protobuf parse, which is faster there (owned arrays either way)."""
    if len(data) < FAST_MIN_BYTES:
        return codec.from_proto(pb.Sample.FromString(data))
    return to_sample(parse(data, copy=copy))
