"""stale.log: the samples moved aside as too stale, kept for inspection (`StaleLog`,
`read_stale`), and `StaleOnce`, which writes each sample id to it at most once.

Moving a stale sample aside is two durable writes: its copy to stale.log, then its DONE record
to the WAL. When the second fails (a failed WAL write, or a crash between the two) the sample
is held again and the next sweep moves it aside again; without `StaleOnce` its copy landed in
stale.log once per try. A failed stale.log write itself leaves nothing behind (the log cuts
it back, `AppendOnlyLog`), so only ids whose copy is durable and whose DONE is not are tracked:
`pending`, found again on open as the stale.log ids the store still holds. It stays as small
as the number of such failures; an id leaves it once its DONE is durable.
"""

from __future__ import annotations

import os
import pathlib
import threading
from typing import Collection, Iterable

from clawjax.buffer.append_log import AppendOnlyLog
from clawjax.buffer.records import RecordType, decode_push, encode_push, push_id, read_records


class StaleLog(AppendOnlyLog):
    """`dir/stale.log`: samples moved aside as too stale, kept for inspection (PUSH records)."""

    def __init__(self, directory: str | os.PathLike, fsync: bool = True,
                 keep_opened: bool = False):
        super().__init__(pathlib.Path(directory) / "stale.log", fsync, keep_opened)

    def append(self, items: Iterable[tuple[str, int, bytes]]) -> None:
        """Appends (sample_id, policy_version, serialized Sample) triples durably."""
        self.append_records((RecordType.PUSH, encode_push(*item)) for item in items)


def read_stale(directory: str | os.PathLike) -> list[tuple[str, int, bytes]]:
    """Samples moved aside in `directory`: [(sample_id, policy_version, serialized Sample)]."""
    path = pathlib.Path(directory) / "stale.log"
    if not path.exists():
        return []
    records, _, _ = read_records(path)
    return [decode_push(p) for t, p in records if t == RecordType.PUSH]


class StaleOnce:
    """Wraps `StaleLog(directory)`; `append` skips ids already in it whose DONE is pending."""

    def __init__(self, directory: str | os.PathLike, fsync: bool = True):
        self.log = StaleLog(directory, fsync=fsync, keep_opened=True)
        self.pending: set[str] = set()
        self._lock = threading.Lock()

    def recover(self, held: Collection[str]) -> None:
        """On open, after the WAL's replay: the ids in stale.log that the store still `held`
        (moved aside before a crash or a failed DONE write) are pending. Takes the records the
        log read on open (its torn-tail check reads it whole), so none of its bytes stay."""
        records = self.log.records()
        ids = (push_id(p) for t, p in records if t == RecordType.PUSH) if held else ()
        self.pending = {sid for sid in ids if sid in held}

    def append(self, items: Iterable[tuple[str, int, bytes]]) -> None:
        """Appends the (sample_id, policy_version, serialized Sample) items not yet in
        stale.log, durably; raises (writing nothing) as `StaleLog.append` does."""
        with self._lock:
            new = [item for item in items if item[0] not in self.pending]
            if new:
                self.log.append(new)
                self.pending.update(sid for sid, _, _ in new)

    def finished(self, ids: Iterable[str]) -> None:
        """`ids` are durably DONE: none of them is moved aside again. O(1) while none is
        pending (the usual case: called on every ack)."""
        if self.pending:
            with self._lock:
                self.pending.difference_update(ids)
