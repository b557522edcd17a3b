"""Write-ahead log: records in numbered segment files, group-committed fsync, torn-tail
truncation on open, and compaction of sealed segments.

On disk (`dir/wal/`): segments `wal-00000001.log`, `wal-00000002.log`, ...; each is a record
file (`records.py`: `MAGIC`, then checksummed records). Only the highest-numbered segment (the
active one) is ever appended to; the others are sealed (fully written and fsynced before the
next one was created).

Invariants:
- `append` returns only after its records are written and fsynced (when `fsync=True`). Group
  commit without hand-offs: an appender that finds no write in progress becomes the leader and
  itself writes every pending append (one writev) and fdatasyncs once; appends arriving
  meanwhile queue, and the next leader covers them all with one fdatasync. An uncontended
  append so never waits for another thread (each thread wake-up cost more than the crc32 and
  the write of a 1.3 MB push on the machines measured). After any I/O error the log refuses
  all further appends.
- On open, a torn or corrupt tail of the active segment (short header, short payload, checksum or
  type mismatch) is truncated at the first bad record; everything before it is kept. Corruption
  inside a sealed segment is not a torn write and raises `WalCorruptError`.
- `compact` replaces sealed segments 1..k by one file carrying what `keep` returns, written to a
  temporary file, fsynced and renamed over segment k before 1..k-1 are deleted, so a crash at
  any point leaves a log that replays to the same state (replay is idempotent per sample id).
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import pathlib
import threading
from typing import Callable, Iterable, Iterator

# The write helpers, under the names the log calls (fault tests patch them in this module).
from clawjax.buffer.fileio import fsync_dir as _fsync_dir
from clawjax.buffer.fileio import write_all as _write_all
from clawjax.buffer.fileio import writev_all as _writev_all
from clawjax.buffer.records import (HEADER, MAGIC, RecordType, read_records, record_parts,
                                    scan_records, truncate_torn_tail)

# Defined here before they got modules of their own, and still imported from here:
from clawjax.buffer.append_log import AppendOnlyLog  # noqa: F401
from clawjax.buffer.records import (MAX_RECORD, decode_push, encode_push,  # noqa: F401
                                    encode_record, push_id)
from clawjax.buffer.stale import StaleLog, read_stale  # noqa: F401

log = logging.getLogger(__name__)


class WalCorruptError(RuntimeError):
    """A sealed segment is damaged (not a torn tail): names the file and the offset."""


class WalClosedError(RuntimeError):
    """The log was closed, or a write failed and the log refuses further appends."""


class _Waiter:
    """One append: its buffers, and once `done` (set under the log's lock) its segment or
    error."""
    __slots__ = ("data", "done", "segment", "error")

    def __init__(self, data: list):
        self.data, self.done, self.segment, self.error = data, False, 0, None


def lock_path(directory: str | os.PathLike) -> pathlib.Path:
    """The file a live log under `directory` (a buffer's `--dir`) holds an exclusive flock on."""
    return pathlib.Path(directory) / "wal" / "LOCK"


def in_use(directory: str | os.PathLike) -> bool:
    """True while a `WriteAheadLog` under `directory` is open, in this process or another."""
    path = lock_path(directory)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if we took it
    return False


class WriteAheadLog:
    """The buffer's log. `replay()` once after construction, then `append` from any thread."""

    def __init__(self, directory: str | os.PathLike, segment_bytes: int = 64 << 20,
                 fsync: bool = True):
        self.dir = lock_path(directory).parent
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(lock_path(directory), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"{self.dir} is in use by another buffer process (LOCK is held)")
        self.segment_bytes = int(segment_bytes)
        self.fsync = fsync
        self.fsyncs_total = 0
        self.compactions_total = 0
        self._cv = threading.Condition()        # guards _pending, _leading, _closed, _failed
        self._pending: list[_Waiter] = []       # appends waiting for the next leader
        self._leading = False                   # an appender is writing + syncing a group
        self._closed = False
        self._failed: BaseException | None = None
        self._seg_lock = threading.Lock()   # guards the segment list (writer vs compaction)
        self._compact_lock = threading.Lock()
        self._fd = -1
        self._active = 0
        self._active_size = 0
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink()

    # ------------------------------------------------------------------ segments
    def _path(self, n: int) -> pathlib.Path:
        return self.dir / f"wal-{n:08d}.log"

    def segments(self) -> list[int]:
        """Segment numbers present on disk, ascending."""
        return sorted(int(p.stem[4:]) for p in self.dir.glob("wal-*.log"))

    def sealed(self) -> list[int]:
        with self._seg_lock:
            return [n for n in self.segments() if n < self._active]

    def disk_bytes(self) -> int:
        """Bytes of the segments on disk (one a compaction deletes meanwhile counts 0)."""
        total = 0
        for path in self.dir.glob("wal-*.log"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    # ------------------------------------------------------------------ open / replay
    def replay(self) -> Iterator[tuple[int, int, bytes]]:
        """Yields (segment, type, payload) for every good record in order, truncating a torn tail
        of the last segment, then opens the log for appends. Call exactly once."""
        segs = self.segments()
        for i, n in enumerate(segs):
            path = self._path(n)
            records, end, problem = read_records(path)
            if problem is not None:
                if i != len(segs) - 1:
                    raise WalCorruptError(f"{path}: {problem}; a sealed segment is damaged")
                truncate_torn_tail(path, end, problem)
            for rtype, payload in records:
                yield n, rtype, payload
        self._open_active(segs[-1] if segs else 1, create=not segs)

    def _open_active(self, n: int, create: bool) -> None:
        path = self._path(n)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if create:
            _write_all(self._fd, MAGIC)
            os.fsync(self._fd)
            _fsync_dir(self.dir)
        with self._seg_lock:
            self._active = n
        self._active_size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        """Seals the active segment and opens the next (by the leader: no write in flight)."""
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1   # closed: if the next segment cannot be opened, nothing uses this number
        self._open_active(self._active + 1, create=True)

    # ------------------------------------------------------------------ appends
    def append(self, records: Iterable[tuple[int, bytes]]) -> int:
        """Appends records contiguously; returns the segment they landed in once durable."""
        waiter = _Waiter([buf for t, p in records for buf in record_parts(t, p)])
        with self._cv:
            if self._closed or self._failed is not None:
                raise WalClosedError(f"write-ahead log {self.dir} is closed"
                                     + (f" after a write failure: {self._failed}" if self._failed else ""))
            self._pending.append(waiter)
            while self._leading and not waiter.done:
                self._cv.wait()
            batch: list[_Waiter] = []
            if not waiter.done:  # no write in flight: lead everything pending, this one included
                self._leading = True
                batch, self._pending = self._pending, []
        if batch:
            self._write_group(batch)
        if waiter.error is not None:
            raise WalClosedError(f"write-ahead log {self.dir}: write failed: {waiter.error}")
        return waiter.segment

    def _write_group(self, batch: list[_Waiter]) -> None:
        """The leader's work: one writev of the group, one fdatasync, then every append of the
        group returns. After any I/O error nothing more is written (a torn record mid-segment
        would hide later records from replay); the group and all later appends get the error."""
        segment, error = 0, None
        try:
            if self._failed is not None:
                raise self._failed
            if self._active_size >= self.segment_bytes:
                self._rotate()
            self._active_size += _writev_all(self._fd, [b for w in batch for b in w.data])
            if self.fsync:
                os.fdatasync(self._fd)
            self.fsyncs_total += 1
            segment = self._active
        except BaseException as e:  # disk full, I/O error: fail loudly, accept nothing more
            if self._failed is None:
                log.error("WAL write failed: %s", e)
            error = e
        with self._cv:
            if error is not None:
                self._failed = self._failed or error
                error = self._failed
            for w in batch:
                w.segment, w.error, w.done = segment, error, True
            self._leading = False
            self._cv.notify_all()

    def close(self) -> None:
        """Refuses new appends, waits for those already accepted to be durable, closes the
        active segment."""
        with self._cv:
            self._closed = True
            while self._leading or self._pending:
                self._cv.wait()
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # ------------------------------------------------------------------ compaction
    def compact(self, keep: Callable[[list[tuple[int, bytes]]], list[tuple[int, bytes]]]) -> int:
        """Rewrites all sealed segments as one. `keep` gets their records in order (payloads as
        memoryviews of the memory-mapped files) and returns the records to carry over; of the
        PUSH records it returns, each checksum is verified before it is copied (the others are
        dropped unread: compaction touches a dead sample's record header only). `keep` runs
        before anything is written, so it may first make durable elsewhere what the dropped
        records carried (the store's done log). Returns the bytes reclaimed (0 when nothing is
        sealed)."""
        with self._compact_lock:
            segs = self.sealed()
            if not segs:
                return 0
            records, stored, before = [], {}, 0
            for n in segs:
                path = self._path(n)
                with open(path, "rb") as f:
                    view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
                got, end, problem, crcs = scan_records(view, verify_push=False)
                if problem is not None:
                    raise WalCorruptError(f"{path}: {problem}; a sealed segment is damaged")
                for (rtype, payload), crc in zip(got, crcs):
                    if rtype == RecordType.PUSH:
                        stored[id(payload)] = (crc, path)
                records.extend(got)
                before += len(view)
            kept = keep(records)
            last = self._path(segs[-1])
            tmp = last.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(MAGIC)
                for rtype, payload in kept:
                    parts = record_parts(rtype, payload)
                    origin = stored.get(id(payload))
                    if origin is not None and HEADER.unpack(parts[0])[1] != origin[0]:
                        raise WalCorruptError(f"{origin[1]}: checksum mismatch in a PUSH record "
                                              "kept by compaction; a sealed segment is damaged")
                    f.writelines(parts)
                f.flush()
                os.fsync(f.fileno())
            del records, kept, got, stored   # release the mapped views before unlinking
            after = tmp.stat().st_size
            os.replace(tmp, last)
            _fsync_dir(self.dir)
            for n in segs[:-1]:
                self._path(n).unlink()
            _fsync_dir(self.dir)
            self.compactions_total += 1
            return before - after
