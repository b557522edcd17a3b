"""The record file format shared by the WAL's segments, done.log and stale.log: how a record
is framed and checksummed, what each record type carries, and how a file of them is read back.

A record file starts with the 8-byte `MAGIC` and holds records

    u32 payload length | u32 crc32(type byte + payload) | u8 type | payload

little-endian, at most `MAX_RECORD` payload bytes each. A PUSH payload is `encode_push`'s: u64
policy_version | u16 id length | utf-8 id | serialized Sample.

Invariants:
- Reading never raises on bad content: it stops at the first bad record (short header, short
  payload, unknown type, checksum mismatch; a PUSH's checksum is skipped only when the caller
  asks, `scan_records`) and says where and why; every record before it is kept. Whether that
  is a torn tail to cut (`truncate_torn_tail`) or damage to refuse is the caller's call.
- `record_parts` frames a payload given as a list of parts without joining them: a PUSH's
  sample bytes are not copied on their way to the log.
"""

from __future__ import annotations

import enum
import logging
import os
import pathlib
import struct
import zlib

log = logging.getLogger(__name__)

MAGIC = b"CJWAL\x00\x01\n"
HEADER = struct.Struct("<IIB")
MAX_RECORD = 1 << 30


class RecordType(enum.IntEnum):
    PUSH = 1     # payload: encode_push(sample_id, policy_version, sample proto bytes)
    DONE = 2     # payload: SampleIds proto; the ids are finished for good (acked or moved aside)
    POLICY = 3   # payload: PolicyVersion proto; the trainer's announced version


def record_parts(rtype: int, payload) -> list:
    """One record as buffers to write in order: header (length, crc32 over type + payload,
    type), then the payload, which may be given as a list of parts (never copied)."""
    parts = list(payload) if isinstance(payload, (list, tuple)) else [payload]
    length, crc = 0, zlib.crc32(bytes((rtype,)))
    for part in parts:
        length += len(part)
        crc = zlib.crc32(part, crc)
    if length > MAX_RECORD:
        raise ValueError(f"WAL record payload of {length} bytes, expected ≤ {MAX_RECORD}")
    return [HEADER.pack(length, crc, rtype), *parts]


def encode_record(rtype: int, payload) -> bytes:
    """One record's bytes (see `record_parts`)."""
    return b"".join(record_parts(rtype, payload))


_PUSH_HEAD = struct.Struct("<QH")


def encode_push(sample_id: str, policy_version: int, sample_bytes) -> tuple:
    """PUSH payload as two parts: u64 policy_version | u16 id length | utf-8 id, then the
    serialized Sample (id and version are readable without parsing the sample)."""
    sid = sample_id.encode()
    return _PUSH_HEAD.pack(policy_version, len(sid)) + sid, sample_bytes


def decode_push(payload: bytes) -> tuple[str, int, bytes]:
    """Inverse of `encode_push`: (sample_id, policy_version, serialized Sample)."""
    version, n = _PUSH_HEAD.unpack_from(payload)
    start = _PUSH_HEAD.size
    return payload[start:start + n].decode(), version, payload[start + n:]


def push_id(payload) -> str:
    """The sample id of a PUSH payload, without copying the sample bytes (`decode_push`[0])."""
    _, n = _PUSH_HEAD.unpack_from(payload)
    return bytes(payload[_PUSH_HEAD.size:_PUSH_HEAD.size + n]).decode()


_TYPE_CRC = {int(t): zlib.crc32(bytes((int(t),))) for t in RecordType}


def read_records(path: pathlib.Path, copy: bool = True
                 ) -> tuple[list[tuple[int, bytes]], int, str | None]:
    """Reads one segment: (records [(type, payload)], offset of the end of the last good record,
    why reading stopped early or None). Never raises on bad content. With `copy=False` the
    payloads are memoryviews of one buffer holding the whole file (no copy per record)."""
    data = path.read_bytes()
    records, end, problem, _ = scan_records(data if copy else memoryview(data), verify_push=True)
    return records, end, problem


def scan_records(data, verify_push: bool = True
                 ) -> tuple[list[tuple[int, bytes]], int, str | None, list[int]]:
    """Walks the records of a segment held in `data` (bytes, or a memoryview for zero-copy
    payload slices): (records, end of the last good record, why it stopped early or None,
    each record's stored crc32). Every non-PUSH record's checksum is verified; PUSH payloads
    only with `verify_push` (compaction verifies just the ones it keeps: a dead sample's
    payload is never read, only its record header)."""
    if len(data) < len(MAGIC) or bytes(data[:len(MAGIC)]) != MAGIC:
        return [], 0, f"bad or missing magic {bytes(data[:len(MAGIC)])!r}", []
    records, crcs, off, size = [], [], len(MAGIC), len(data)
    while off < size:
        if off + HEADER.size > size:
            return records, off, f"short header at offset {off}", crcs
        length, crc, rtype = HEADER.unpack_from(data, off)
        start = off + HEADER.size
        if start + length > size:
            return records, off, f"short payload at offset {off} ({length} bytes announced)", crcs
        payload = data[start:start + length]
        if rtype not in _TYPE_CRC or (
                (verify_push or rtype != RecordType.PUSH)
                and zlib.crc32(payload, _TYPE_CRC[rtype]) != crc):
            return records, off, f"checksum or type mismatch at offset {off}", crcs
        records.append((rtype, payload))
        crcs.append(crc)
        off = start + length
    return records, off, None, crcs


def truncate_torn_tail(path: pathlib.Path, end: int, problem: str, fsync: bool = True) -> None:
    """Cuts a record file at `end`, the end of its last good record (`read_records`), after
    logging `problem`; a file without even a good `MAGIC` is left holding just `MAGIC`."""
    log.warning("%s: %s; truncating the torn tail (%d bytes)", path, problem,
                path.stat().st_size - end)
    with open(path, "r+b") as f:
        if end == 0:
            f.write(MAGIC)
            end = len(MAGIC)
        f.truncate(end)
        f.flush()
        if fsync:
            os.fsync(f.fileno())

