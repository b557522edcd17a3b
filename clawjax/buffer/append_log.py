"""`AppendOnlyLog`: a file of records in the WAL's format (`records.py`), appended durably and
never compacted; the base of done.log (`compaction.DoneLog`) and stale.log (`stale.StaleLog`).

Invariants:
- An append is all or nothing: durable on return (with `fsync`), or cut back to the file's
  length before it and raised, so no later record ever lands behind torn bytes. A log whose cut
  failed too refuses every later append.
- On open a torn or corrupt tail is truncated at the first bad record, as for the WAL's active
  segment; a missing file is created durably.
- `rotate` (stale.log's byte cap) renames the file away whole and starts an empty one; the log
  never rewrites a record in place.
"""

from __future__ import annotations

import logging
import os
import pathlib
import threading
from typing import Iterable

from clawjax.buffer.fileio import fsync_dir, write_all
from clawjax.buffer.records import MAGIC, encode_record, read_records, truncate_torn_tail

log = logging.getLogger(__name__)


class AppendOnlyLog:
    """A file of records in the WAL's format (after `MAGIC`), appended and fsynced under a lock,
    never compacted. On open a torn or corrupt tail is truncated at the first bad record (as for
    the WAL's active segment); a missing file is created durably (file and directory fsynced,
    with `fsync`).

    An append that fails part way (a short write, ENOSPC, a failed fsync) is cut back to the
    file's length before it and raises, so the next append never lands behind torn bytes (on
    open those would read as a torn tail, and every record after them would be cut). If even
    the cut fails, the log refuses every later append.

    With `keep_opened`, the records read on open are kept (zero-copy views of the file's bytes)
    and handed to the first `records()` call, if nothing was appended in between, so a log read
    once at start-up (done.log) is read from disk once; the first `records()` releases them."""

    def __init__(self, path: str | os.PathLike, fsync: bool = True, keep_opened: bool = False):
        self.path = pathlib.Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._opened: list[tuple[int, memoryview]] | None = None
        self._broken: str | None = None   # why appends are refused (a failed append stuck)
        if self.path.exists():
            records, end, problem = read_records(self.path, copy=False)
            if problem is not None:
                truncate_torn_tail(self.path, end, problem, fsync=fsync)
            if keep_opened:
                self._opened = records
        else:
            self._create()

    def _create(self) -> None:
        """Writes a new file holding `MAGIC` alone at `path`, durably (file and directory
        fsynced, with `fsync`)."""
        self._write_empty(self.path)
        if self.fsync:
            fsync_dir(self.path.parent)

    def _write_empty(self, path: pathlib.Path) -> None:
        """Writes `path` holding `MAGIC` alone (the file fsynced, with `fsync`); a failed write
        leaves no file there."""
        try:
            with open(path, "wb") as f:
                f.write(MAGIC)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def append_records(self, records: Iterable[tuple[int, bytes]]) -> None:
        """Appends (type, payload) records; durable on return (with `fsync`). All or nothing:
        a failed append leaves the file as it was (see the class docstring) and raises."""
        data = b"".join(encode_record(rtype, payload) for rtype, payload in records)
        if not data:
            return
        with self._lock:
            if self._broken is not None:
                raise OSError(f"{self.path}: appends refused: {self._broken}")
            self._opened = None
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                start = os.fstat(fd).st_size
                try:
                    write_all(fd, data)
                    if self.fsync:
                        os.fsync(fd)
                except BaseException as error:
                    self._undo_append(fd, start, error)
                    raise
            finally:
                os.close(fd)

    def _undo_append(self, fd: int, start: int, error: BaseException) -> None:
        """Cuts the file back to `start` bytes after a failed append (`error`)."""
        try:
            os.ftruncate(fd, start)
            if self.fsync:
                os.fsync(fd)
        except OSError as cut_error:
            self._broken = (f"an append failed ({error!r}) and cutting the file back to "
                            f"{start} bytes failed too ({cut_error!r})")
            log.error("%s: %s", self.path, self._broken)

    def rotate(self, to: pathlib.Path) -> None:
        """Renames the file to `to` (replacing what was there) and starts a new, empty one at
        `path`, durably. The new file is written aside first, so a failure to write it (a full
        disk) leaves the log as it was; a crash between the two renames leaves no file at
        `path`: the next open creates it. Records read on open and not yet taken by
        `records()` are dropped."""
        with self._lock:
            if self._broken is not None:
                raise OSError(f"{self.path}: rotation refused: {self._broken}")
            fresh = self.path.with_name(self.path.name + ".new")
            self._write_empty(fresh)
            self._opened = None
            os.replace(self.path, to)
            os.replace(fresh, self.path)
            if self.fsync:
                fsync_dir(self.path.parent)

    def records(self) -> list[tuple[int, bytes | memoryview]]:
        """Every good record, in order (payloads bytes, or memoryviews the first time with
        `keep_opened`)."""
        with self._lock:
            opened, self._opened = self._opened, None
        if opened is not None:
            return opened
        records, _, _ = read_records(self.path)
        return records

    def disk_bytes(self) -> int:
        return self.path.stat().st_size
