"""Write-ahead log: checksummed records in numbered segment files, group-committed fsync,
torn-tail truncation on open, and compaction of sealed segments.

On disk (`dir/wal/`): segments `wal-00000001.log`, `wal-00000002.log`, ...; each starts with the
8-byte `MAGIC` and holds records

    u32 payload length | u32 crc32(type byte + payload) | u8 type | payload

little-endian. Only the highest-numbered segment (the active one) is ever appended to; the others
are sealed (fully written and fsynced before the next one was created).

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

import enum
import fcntl
import logging
import mmap
import os
import pathlib
import struct
import threading
import zlib
from typing import Callable, Iterable, Iterator

log = logging.getLogger(__name__)

MAGIC = b"CJWAL\x00\x01\n"
HEADER = struct.Struct("<IIB")
MAX_RECORD = 1 << 30


class RecordType(enum.IntEnum):
    PUSH = 1     # payload: encode_push(sample_id, policy_version, sample proto bytes)
    DONE = 2     # payload: SampleIds proto; the ids are finished for good (acked or moved aside)
    POLICY = 3   # payload: PolicyVersion proto; the trainer's announced version


class WalCorruptError(RuntimeError):
    """A sealed segment is damaged (not a torn tail): names the file and the offset."""


class WalClosedError(RuntimeError):
    """The log was closed, or a write failed and the log refuses further appends."""


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


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


_IOV_MAX = 1024


def _nbytes(buf) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def _writev_all(fd: int, buffers: list) -> int:
    """Writes every buffer in order (handles short writes); returns the byte count. Buffers are
    passed to writev as they are (no per-buffer view objects on the hot path: they would feed
    the cyclic GC); only a partly written one is re-sliced."""
    pending = [b for b in buffers if _nbytes(b)]
    sizes = [_nbytes(b) for b in pending]
    total = i = 0
    while i < len(pending):
        n = os.writev(fd, pending[i:i + _IOV_MAX])
        total += n
        while i < len(pending) and n >= sizes[i]:
            n -= sizes[i]
            i += 1
        if n:
            pending[i] = memoryview(pending[i]).cast("B")[n:]
            sizes[i] -= n
    return total


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
            with open(self.path, "wb") as f:
                f.write(MAGIC)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            if fsync:
                _fsync_dir(self.path.parent)

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
                    _write_all(fd, data)
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
