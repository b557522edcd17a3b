"""What a compacted WAL segment carries over from the sealed segments it replaces.

Pure function of the records and the set of finished ids: the last POLICY record, one DONE list
of every finished id seen (so pushes of them stay duplicates forever), and every PUSH whose id is
not finished, in their original order. Replaying the result gives the same store state as
replaying the originals (tests/test_buffer_wal.py).
"""

from __future__ import annotations

from typing import Container

from clawjax.buffer import rollout_pb2 as pb
from clawjax.buffer.wal import RecordType, push_id

DONE_CHUNK = 50_000  # ids per DONE record


def ids_payload(ids) -> bytes:
    """DONE payload: a serialized `SampleIds`."""
    return pb.SampleIds(sample_ids=list(ids)).SerializeToString()


def carry_over(records: list[tuple[int, bytes]], done: Container[str]
               ) -> list[tuple[int, bytes]]:
    """Records for the compacted segment. `done` must only hold ids whose DONE record is
    durable; a PUSH of any other id is kept."""
    policy, done_ids, pushes = None, {}, []
    for rtype, payload in records:
        if rtype == RecordType.PUSH:
            sid = push_id(payload)
            if sid in done:
                done_ids[sid] = None
            else:
                pushes.append((rtype, payload))
        elif rtype == RecordType.DONE:
            done_ids.update(dict.fromkeys(pb.SampleIds.FromString(payload).sample_ids))
        elif rtype == RecordType.POLICY:
            policy = payload
    ids = list(done_ids)
    out = [] if policy is None else [(RecordType.POLICY, policy)]
    out += [(RecordType.DONE, ids_payload(ids[i:i + DONE_CHUNK]))
            for i in range(0, len(ids), DONE_CHUNK)]
    return out + pushes
