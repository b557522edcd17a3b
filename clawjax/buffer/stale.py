"""stale.log: the samples moved aside as too stale, kept for inspection (`StaleLog`,
`read_stale`), and `StaleOnce`, which writes each sample id to it at most once.

Moving a stale sample aside is two durable writes: its copy to stale.log, then its DONE record
to the WAL. When the second fails (a failed WAL write, or a crash between the two) the sample
is held again and the next sweep moves it aside again; without `StaleOnce` its copy landed in
stale.log once per try. A failed stale.log write itself leaves nothing behind (the log cuts
it back, `AppendOnlyLog`), so only ids whose copy is durable and whose DONE is not are tracked:
`pending`, found again on open as the ids of stale.log and stale.log.1 that the store still
holds. It stays as small as the number of such failures; an id leaves it once its DONE is
durable.

Byte cap: the copies are whole serialized samples, so the log is bounded by `max_bytes`
(`--max-stale-bytes`): once stale.log would grow past half of it, it is renamed to
stale.log.1 (replacing the older rotation, whose records are dropped) and a new stale.log is
started. The two files hold at most about `max_bytes` (more only by one append larger than
half of it), and that is all a start reads: stale.log whole (its torn-tail check), and
stale.log.1 too while samples are held (for `pending`). The newest copies are kept. A pending
id whose copy was rotated away is found in neither file after a restart and is copied again
when it is moved aside: still at most once in the files kept.
"""

from __future__ import annotations

import os
import pathlib
import threading
from typing import Collection, Iterable

from clawjax.buffer.append_log import AppendOnlyLog
from clawjax.buffer.records import (HEADER, MAGIC, RecordType, decode_push, encode_push, push_id,
                                    read_records)

DEFAULT_MAX_STALE_BYTES = 256 << 20   # stale.log + stale.log.1
ROTATED = "stale.log.1"


def check_max_stale_bytes(max_bytes: int) -> int:
    """`max_bytes` as an int; ValueError naming it unless an integer ≥ 1."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_stale_bytes (--max-stale-bytes) = {max_bytes!r}, expected an "
                         "integer ≥ 1 (bytes kept in stale.log and stale.log.1 together)")
    return max_bytes


class StaleLog(AppendOnlyLog):
    """`dir/stale.log`: samples moved aside as too stale, kept for inspection (PUSH records),
    rotated to `dir/stale.log.1` past half of `max_bytes` (module docstring)."""

    def __init__(self, directory: str | os.PathLike, fsync: bool = True,
                 keep_opened: bool = False, max_bytes: int = DEFAULT_MAX_STALE_BYTES):
        super().__init__(pathlib.Path(directory) / "stale.log", fsync, keep_opened)
        self.max_bytes = check_max_stale_bytes(max_bytes)
        self.rotated = self.path.with_name(ROTATED)
        self._append_lock = threading.Lock()   # the size check and its append are one step

    def append(self, items: Iterable[tuple[str, int, bytes]]) -> None:
        """Appends (sample_id, policy_version, serialized Sample) triples durably, first
        rotating the file when they would take it past `max_bytes // 2` (unless it is empty)."""
        records = [(RecordType.PUSH, encode_push(*item)) for item in items]
        size = sum(HEADER.size + len(head) + len(data) for _, (head, data) in records)
        with self._append_lock:
            file_bytes = self.disk_bytes()
            if file_bytes > len(MAGIC) and file_bytes + size > self.max_bytes // 2:
                self.rotate(self.rotated)
            self.append_records(records)

    def rotated_records(self) -> list[tuple[int, memoryview]]:
        """The good records of stale.log.1 (none when there is no such file), as views of one
        buffer holding the file."""
        if not self.rotated.exists():
            return []
        records, _, _ = read_records(self.rotated, copy=False)
        return records


def read_stale(directory: str | os.PathLike) -> list[tuple[str, int, bytes]]:
    """Samples moved aside in `directory` and still kept (stale.log.1, then stale.log), oldest
    first: [(sample_id, policy_version, serialized Sample)]."""
    out = []
    for name in (ROTATED, "stale.log"):
        path = pathlib.Path(directory) / name
        if path.exists():
            records, _, _ = read_records(path)
            out += [decode_push(p) for t, p in records if t == RecordType.PUSH]
    return out


class StaleOnce:
    """Wraps `StaleLog(directory)`; `append` skips ids already in it whose DONE is pending."""

    def __init__(self, directory: str | os.PathLike, fsync: bool = True,
                 max_bytes: int = DEFAULT_MAX_STALE_BYTES):
        self.log = StaleLog(directory, fsync=fsync, keep_opened=True, max_bytes=max_bytes)
        self.pending: set[str] = set()
        self._lock = threading.Lock()

    def recover(self, held: Collection[str]) -> None:
        """On open, after the WAL's replay: the ids in stale.log and stale.log.1 that the
        store still `held` (moved aside before a crash or a failed DONE write) are pending.
        Takes the records the log read on open (its torn-tail check reads it whole), so none
        of its bytes stay; stale.log.1 is read only when something is held."""
        records = self.log.records()
        if not held:
            self.pending = set()
            return
        records = self.log.rotated_records() + records
        self.pending = {sid for sid in (push_id(p) for t, p in records if t == RecordType.PUSH)
                        if sid in held}

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
