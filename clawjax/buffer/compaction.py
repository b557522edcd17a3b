"""What a compaction of sealed WAL segments keeps, and which finished ids it hands to the done
log (`done.log`, `DoneLog`).

Pure function of the records and the set of finished ids. The compacted segment carries the last
POLICY record and every PUSH whose id is not finished, in their original order; nothing else.
The finished ids the compacted segments mention (their DONE records, and the ids of the dead
PUSH records) go to the done log, which the store makes durable before the segments that held
them are replaced. Each finished id is so written to the done log once, by the compaction that
removes its records, and is never rewritten: a compaction costs what the segments it reads
hold, not what the buffer ever finished.

Replaying the done log and then the compacted WAL gives the same store state as replaying the
originals (tests/test_buffer_compaction.py).
"""

from __future__ import annotations

import os
import pathlib
from typing import Container, Iterable, Iterator, NamedTuple

from clawjax.buffer import rollout_pb2 as pb
from clawjax.buffer.append_log import AppendOnlyLog
from clawjax.buffer.done_set import digests
from clawjax.buffer.records import RecordType, push_id

DONE_CHUNK = 50_000  # ids per DONE record


def ids_payload(ids) -> bytes:
    """DONE payload: a serialized `SampleIds`."""
    return pb.SampleIds(sample_ids=list(ids)).SerializeToString()


def done_ids_payload(ids: list[str]) -> bytes:
    """done.log's DONE payload: a serialized `DoneIds`, the ids and their packed digests."""
    return pb.DoneIds(sample_ids=ids, digests=b"".join(digests(ids))).SerializeToString()


def done_records(ids: list[str], with_digests: bool = False) -> list[tuple[int, bytes]]:
    """DONE records for `ids`, at most `DONE_CHUNK` ids each (none for no ids): `SampleIds`
    payloads (the WAL's), or with `with_digests` `DoneIds` payloads (done.log's)."""
    payload = done_ids_payload if with_digests else ids_payload
    return [(RecordType.DONE, payload(ids[i:i + DONE_CHUNK]))
            for i in range(0, len(ids), DONE_CHUNK)]


class Compacted(NamedTuple):
    """`records` for the compacted segment; `finished` ids for the done log (no repeats)."""
    records: list[tuple[int, bytes]]
    finished: list[str]


def carry_over(records: list[tuple[int, bytes]], done: Container[str]) -> Compacted:
    """Splits sealed segments' records. `done` must only hold ids whose DONE record is durable
    (in the WAL or the done log); a PUSH of any other id is kept. `done` is only tested for
    membership (all PUSH ids in one `contains_many` call when it has one, as `DoneSet` does),
    so the store's live set may be passed (ids only ever join it)."""
    ids = [push_id(payload) for rtype, payload in records if rtype == RecordType.PUSH]
    members = iter(zip(ids, done.contains_many(ids) if hasattr(done, "contains_many")
                       else [sid in done for sid in ids]))
    policy, finished, pushes = None, {}, []
    for rtype, payload in records:
        if rtype == RecordType.PUSH:
            sid, is_done = next(members)
            if is_done:
                finished[sid] = None
            else:
                pushes.append((rtype, payload))
        elif rtype == RecordType.DONE:
            finished.update(dict.fromkeys(pb.SampleIds.FromString(payload).sample_ids))
        elif rtype == RecordType.POLICY:
            policy = payload
    kept = [] if policy is None else [(RecordType.POLICY, policy)]
    return Compacted(kept + pushes, list(finished))


class DoneLog(AppendOnlyLog):
    """`dir/done.log`: ids finished for good (acked or moved aside) whose DONE records a
    compaction removed from the WAL. DONE records of at most `DONE_CHUNK` ids, each a `DoneIds`:
    the ids and their packed 16-byte digests (`done_set.digests`, 16 bytes per id on disk), so
    a restart loads the digests (`key_chunks`) and hashes nothing. Records written before the
    digests were stored are plain `SampleIds` and are hashed when read. Read on open (before
    the WAL replay, from the bytes read on open: the file is read once); appended by
    compactions."""

    def __init__(self, directory: str | os.PathLike, fsync: bool = True):
        super().__init__(pathlib.Path(directory) / "done.log", fsync=fsync, keep_opened=True)

    def append(self, ids: Iterable[str]) -> None:
        """Appends ids and their digests durably (returns once fsynced)."""
        self.append_records(done_records(list(ids), with_digests=True))

    def key_chunks(self) -> Iterator[bytes]:
        """The recorded ids' packed 16-byte digests, one DONE record at a time, in order. A
        record's stored digests are taken as they are; a record without them (written before
        they were stored) has its ids hashed. Raises ValueError naming the record when its
        digests are not whole 16-byte keys (records are checksummed, so only a writer's bug
        could do that)."""
        for index, (rtype, payload) in enumerate(self.records()):
            if rtype != RecordType.DONE:
                continue
            packed = pb.DoneDigests.FromString(payload).digests
            if not packed:
                yield b"".join(digests(pb.SampleIds.FromString(payload).sample_ids))
                continue
            if len(packed) % 16:
                raise ValueError(f"{self.path} record {index}: digests of {len(packed)} bytes, "
                                 "expected 16 bytes per id")
            yield packed

    def id_chunks(self) -> Iterator[list[str]]:
        """The ids recorded, in order, one DONE record (at most `DONE_CHUNK` ids) at a time."""
        for rtype, payload in self.records():
            if rtype == RecordType.DONE:
                yield list(pb.SampleIds.FromString(payload).sample_ids)

    def ids(self) -> list[str]:
        """Every id recorded, in order."""
        return [sid for chunk in self.id_chunks() for sid in chunk]
