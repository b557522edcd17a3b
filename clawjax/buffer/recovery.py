"""Rebuilding the store's held samples on open, from done.log and then the WAL.

A live sample is the first PUSH of an id that no DONE record (in done.log or the WAL) names.
A push of a finished id is refused before it is logged, so an id's PUSH records all precede its
DONE in the WAL: a DONE drops the entries it names as it is read, and the ids of done.log (whose
PUSH records a crash inside a compaction can leave in the WAL) are dropped once, at the end, in
one `contains_many`. done.log's stored digests go into the finished set in one bulk merge
(`DoneSet.merge_packed`), hashing nothing.

Invariants:
- Replay is idempotent per sample id: a second PUSH of a live id keeps the first; a compaction
  interrupted anywhere (done.log appended, segments not yet replaced or deleted) recovers the
  same samples.
- The recovered entries are all QUEUED, in the order of their first PUSH; the policy version
  is the WAL's last POLICY record (0 without one).
"""

from __future__ import annotations

from clawjax.buffer import rollout_pb2 as pb
from clawjax.buffer.compaction import DoneLog
from clawjax.buffer.done_set import DoneSet
from clawjax.buffer.leases import Entry
from clawjax.buffer.records import RecordType, decode_push
from clawjax.buffer.wal import WriteAheadLog


def recover(wal: WriteAheadLog, done_log: DoneLog, done: DoneSet
            ) -> tuple[dict[str, Entry], int]:
    """Replays `done_log` into `done`, then `wal` (`WriteAheadLog.replay`, which opens it for
    appends); the WAL's finished ids join `done` too. Returns (the live samples by id, the
    announced policy version)."""
    done.merge_packed(done_log.key_chunks())
    entries: dict[str, Entry] = {}
    policy_version = 0
    for seg, rtype, payload in wal.replay():
        if rtype == RecordType.PUSH:
            sid, version, data = decode_push(payload)
            if sid not in entries:
                entries[sid] = Entry(data, version, seg)
        elif rtype == RecordType.DONE:
            ids = pb.SampleIds.FromString(payload).sample_ids
            for sid in ids:
                entries.pop(sid, None)
            done.update(ids)
            done.consolidate()
        elif rtype == RecordType.POLICY:
            policy_version = pb.PolicyVersion.FromString(payload).version
    ids = list(entries)
    for sid, finished in zip(ids, done.contains_many(ids)):
        if finished:
            del entries[sid]
    return entries, policy_version
