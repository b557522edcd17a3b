"""The buffer's state: a durable FIFO of serialized samples with leases, acks, staleness and a
byte capacity, rebuilt from the write-ahead log on open (`recovery.py`).

Every sample the store holds is in exactly one state (kept with the leases by `leases.py`):
  queued    deliverable (in the `_ready` deque, FIFO; nacked and expired leases go to the front)
  leased    handed to a consumer until `deadline` (monotonic seconds); invisible to others;
            `holder` is the consumer token of the request that leased it (None without one)
  finishing being acked or moved aside (the DONE record is being made durable)
and once the DONE record is durable its id moves to `_done` for good (pushes of it are ignored
as duplicates forever; it joins `_done` just before it leaves `_entries`, so a push never finds
it in neither). Compaction (`compactor.py`) moves finished ids out of the WAL into `done.log`,
written once per id and never rewritten; the in-memory `DoneSet` and that file are the only
things that grow with the number of samples ever finished (about 16-22 bytes of memory and the
id's length + 18 bytes of disk per id: the id and its 16-byte digest, which a restart loads
without hashing).

Invariants:
- `push` returns only after every new sample is in the WAL and fsynced; a duplicate of an id whose
  first push is still in flight waits for that push to become durable.
- `bytes` (capacity) counts queued + leased + finishing samples: len(serialized Sample) each.
- Leases live only in memory: after a restart every unacked sample is queued again.
- A sample with policy_version < announced - max_staleness is never delivered: it is appended to
  `stale.log` (fsynced, at most once per id: `StaleOnce`), then marked DONE in the WAL, and
  counted in `stale_total`. stale.log and its one rotation hold about `max_stale_bytes` at most
  (the newest copies; `stale.py`).
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import threading
import time

from clawjax.buffer import rollout_pb2 as pb
from clawjax.buffer.compaction import DoneLog, done_records
from clawjax.buffer.compactor import Compactor
from clawjax.buffer.done_set import DoneSet, digests
from clawjax.buffer.leases import FINISHING, LEASED, QUEUED, Entry, LeaseTable
from clawjax.buffer.records import RecordType, encode_push
from clawjax.buffer.recovery import recover
from clawjax.buffer.stale import DEFAULT_MAX_STALE_BYTES, StaleOnce, check_max_stale_bytes
from clawjax.buffer.wal import WriteAheadLog

log = logging.getLogger(__name__)


class BufferFull(Exception):
    """A push would exceed `max_bytes`; retry after `retry_after_s`."""

    def __init__(self, needed: int, used: int, max_bytes: int, retry_after_s: float):
        self.retry_after_s = retry_after_s
        super().__init__(f"buffer full: push of {needed} bytes with {used} of max_bytes={max_bytes}"
                         f" in use; retry after {retry_after_s:.2f} s")


class BatchTooLarge(ValueError):
    """A single push is larger than the whole capacity: it can never succeed."""


_NONE = Entry(b"", 0, 0)


class Store(LeaseTable):
    """Thread-safe buffer state over a `WriteAheadLog` in `directory`: the durable transitions
    (push, ack, moving stale samples aside, policy announcements) and compaction, on the
    in-memory states and leases of `LeaseTable`."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int = 1 << 30,
                 lease_timeout_s: float = 60.0, max_staleness: int | None = None,
                 segment_bytes: int = 64 << 20, fsync: bool = True,
                 compact_interval_s: float = 1.0, retry_after_s: float = 0.2,
                 max_stale_bytes: int = DEFAULT_MAX_STALE_BYTES):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes = {max_bytes}, expected a positive byte count")
        if not (math.isfinite(lease_timeout_s) and lease_timeout_s > 0):  # NaN/inf: never
            raise ValueError(f"lease_timeout_s = {lease_timeout_s}, expected a finite number of "
                             "seconds > 0")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness = {max_staleness}, expected ≥ 0 or None")
        check_max_stale_bytes(max_stale_bytes)   # before the WAL is opened and locked
        super().__init__(lease_timeout_s)
        self.max_bytes = int(max_bytes)
        self.max_staleness, self.retry_after_s = max_staleness, retry_after_s
        self.compact_interval_s = compact_interval_s
        self._done = DoneSet()
        self._inflight: dict[str, threading.Event] = {}    # pushes being made durable
        self._finishing: dict[str, threading.Event] = {}   # DONE records being made durable
        self.bytes = self._reserved = 0
        self.policy_version = 0
        self._policy_lock = threading.Lock()   # orders policy announcements: WAL == memory
        self.wal = WriteAheadLog(directory, segment_bytes=segment_bytes, fsync=fsync)
        self.stale_log = StaleOnce(directory, fsync=fsync, max_bytes=max_stale_bytes)
        self.done_log = DoneLog(directory, fsync=fsync)
        self._replay()
        # Any held sample may have been copied to stale.log before a crash or a failed DONE
        # write, under this bound or another (a restart with a larger --max-staleness holds it
        # as not stale now, and it may go stale again).
        self.stale_log.recover(self._entries.keys())
        self._stop = threading.Event()
        self._compactor = Compactor(self.wal, self._done, self.done_log, self._live_wal_bytes,
                                    compact_interval_s, self._stop)
        self._compactor.start()
        self._sweep_stale()

    # ------------------------------------------------------------------ recovery
    def _replay(self) -> None:
        """Rebuilds the held samples (all queued) and the policy version from done.log and the
        WAL (`recovery.recover`)."""
        self._entries, self.policy_version = recover(self.wal, self.done_log, self._done)
        self._ready.extend(self._entries)
        self.queued = len(self._entries)
        self.bytes = sum(len(e.data) for e in self._entries.values())
        log.info("buffer recovered: %d queued samples (%d bytes), %d finished ids, policy %d",
                 self.queued, self.bytes, len(self._done), self.policy_version)

    # ------------------------------------------------------------------ push
    def push(self, items: list[tuple[str, int, bytes]]) -> tuple[int, int]:
        """Durably adds (sample_id, policy_version, serialized Sample) items; returns
        (accepted, duplicates). All or nothing: raises `BufferFull` / `BatchTooLarge` before
        anything is written."""
        new, keys, waits, dup, seen = [], [], [], 0, set()
        item_keys = digests([sid for sid, _, _ in items])   # hashed before taking the lock
        with self._cv:
            for item, key in zip(items, item_keys):
                sid = item[0]
                if sid in seen or sid in self._entries:
                    dup += 1
                elif sid in self._inflight:
                    dup += 1
                    waits.append((sid, self._inflight[sid]))
                else:
                    new.append(item)
                    keys.append(key)
                seen.add(sid)
            finished = self._done.contains_digests(keys)
            if any(finished):
                dup += sum(finished)
                new = [item for item, done in zip(new, finished) if not done]
            need = sum(len(d) for _, _, d in new)
            if need > self.max_bytes:
                raise BatchTooLarge(f"push of {need} bytes, expected at most max_bytes="
                                    f"{self.max_bytes} (split the batch)")
            if new and self.bytes + self._reserved + need > self.max_bytes:
                self.counters["backpressure_total"] += 1
                raise BufferFull(need, self.bytes + self._reserved, self.max_bytes,
                                 self.retry_after_s)
            self._reserved += need
            event = threading.Event()
            for sid, _, _ in new:
                self._inflight[sid] = event
        seg, ok, kept = 0, False, []
        try:
            if new:
                seg = self.wal.append([(RecordType.PUSH, encode_push(*item)) for item in new])
                # Own copies: a view into the request would keep all of it (its duplicates,
                # its acked siblings) alive for as long as one sample of it is held.
                kept = [bytes(data) for _, _, data in new]
            ok = True
        finally:
            with self._cv:
                self._reserved -= need
                for i, (sid, version, _) in enumerate(new):
                    del self._inflight[sid]
                    if ok:
                        self._entries[sid] = Entry(kept[i], version, seg)
                        self._ready.append(sid)
                if ok:
                    self.queued += len(new)
                    self.bytes += need
                    self.counters["pushed_total"] += len(new)
                    self.counters["duplicates_total"] += dup
                    self._cv.notify_all()
            event.set()
        for sid, other in waits:
            other.wait()
            with self._cv:
                if sid not in self._entries and sid not in self._done:
                    raise RuntimeError(f"sample {sid!r}: a concurrent push of the same id failed")
        if self._is_stale_version(min((v for _, v, _ in new), default=None)):
            self._sweep_stale()
        return len(new), dup

    # ------------------------------------------------------------------ leases
    def _is_stale_version(self, version: int | None) -> bool:
        return (version is not None and self.max_staleness is not None
                and version + self.max_staleness < self.policy_version)

    def lease(self, max_samples: int, timeout_s: float = 0.0, owner: str | None = None,
              max_out_bytes: int = 1 << 62, holder: str | None = None
              ) -> list[tuple[str, bytes]]:
        """Leases up to `max_samples` queued samples (at most `max_out_bytes` of them, but at
        least one), waiting up to `timeout_s` for the first; returns [(sample_id, serialized
        Sample)]. Stale samples met on the way are moved aside. `owner` counts in-flight leases
        (a Stream); `holder` is the consumer token that alone may nack or extend them
        (`consumer.may_touch`)."""
        until = time.monotonic() + max(timeout_s, 0.0)
        while True:
            out, stale, stale_event = [], [], threading.Event()
            with self._cv:
                self._expire_locked(time.monotonic())
                while self.queued == 0 and time.monotonic() < until and not self._closed:
                    self._wait_locked(until)
                deadline, size = time.monotonic() + self.lease_timeout_s, 0
                while self._ready and len(out) < max_samples:
                    head = self._entries.get(self._ready[0], _NONE)
                    if out and size + len(head.data) > max_out_bytes:
                        break
                    sid = self._ready.popleft()
                    e = self._entries.get(sid)
                    if e is None or e.state != QUEUED:
                        continue
                    self.queued -= 1
                    if self._is_stale_version(e.version):
                        e.state = FINISHING
                        self._finishing[sid] = stale_event
                        stale.append(sid)
                        continue
                    e.state, e.deadline, e.owner, e.holder = LEASED, deadline, owner, holder
                    heapq.heappush(self._heap, (deadline, next(self._seq), sid))
                    out.append((sid, e.data))
                    size += len(e.data)
                self.leased += len(out)
                if owner is not None and out:
                    self._owners[owner] += len(out)
            if stale:
                try:
                    self._move_aside(stale)
                except Exception:  # noqa: BLE001 - they are queued again; the leased go out
                    log.exception("moving %d stale samples aside failed", len(stale))
                    return out
            if out or not stale or time.monotonic() >= until or self._closed:
                return out



    # ------------------------------------------------------------------ finishing
    def _begin_finish_locked(self, ids
                             ) -> tuple[list[str], int, list[tuple[str, threading.Event]]]:
        """Marks held ids FINISHING; returns (them, count of ids not held, (id, event) of ids
        that another call is finishing right now: wait on them before reporting durability)."""
        fin, unknown, waits = [], 0, []
        event = threading.Event()
        for sid in dict.fromkeys(ids):
            e = self._entries.get(sid)
            if e is None or e.state == FINISHING:
                unknown += 1
                if e is not None:
                    waits.append((sid, self._finishing[sid]))
                continue
            if e.state == LEASED:
                self._unlease_locked(e)
            else:
                self.queued -= 1
            e.state = FINISHING
            self._finishing[sid] = event
            fin.append(sid)
        return fin, unknown, waits

    def _finish(self, fin: list[str], counter: str) -> None:
        """Makes DONE for `fin` (all FINISHING) durable, then forgets their payloads."""
        event = self._finishing[fin[0]]
        try:
            self.wal.append(done_records(fin))
        except BaseException:
            self._undo_finish(fin)
            raise
        # Durable, so finished for good; joined outside the lock (hashing is the cost): until
        # the block below, a push of these ids still finds them in `_entries`, a duplicate too.
        self._done.update(fin)
        self.stale_log.finished(fin)
        with self._cv:
            for sid in fin:
                del self._finishing[sid]
                self.bytes -= len(self._entries.pop(sid).data)
            self.counters[counter] += len(fin)
            self._cv.notify_all()
        event.set()

    def _undo_finish(self, fin: list[str]) -> None:
        """`fin` (FINISHING) could not be finished: they are queued again (deliverable, at the
        front) and the calls waiting on them are woken (they find the ids still held)."""
        event = self._finishing[fin[0]]
        with self._cv:
            for sid in fin:
                del self._finishing[sid]
                self._entries[sid].state = QUEUED
                self._ready.appendleft(sid)
            self.queued += len(fin)
            self._cv.notify_all()
        event.set()

    def ack(self, ids: list[str]) -> tuple[int, int]:
        """Finishes ids for good (leased or queued); returns (acked, unknown). Every id this
        call names that the buffer held is durably finished on return, including ids a
        concurrent call (a retried ack, a staleness sweep) was finishing.

        An ack needs no lease, so it takes no holder: a late ack from a consumer whose lease
        expired finishes the sample even if another consumer holds it now (whose ack then
        counts it unknown and whose ExtendLease reports it lost). The late acker did train it,
        and its ack says that update is committed: refusing the ack would leave a trained
        sample deliverable again (once the new holder nacks it or its lease expires), against
        exactly-once-after-ack; honouring it at worst wastes the new holder's copy."""
        with self._cv:
            self._expire_locked(time.monotonic())
            fin, unknown, waits = self._begin_finish_locked(ids)
            self.counters["unknown_acks_total"] += unknown
        if fin:
            self._finish(fin, "acked_total")
        for sid, other in waits:
            other.wait()
            if sid not in self._done:
                raise RuntimeError(f"ack of {sid!r}: a concurrent finish of the same id failed, "
                                   "so it is not finished (it is queued again); retry the ack")
        return len(fin), unknown

    def _move_aside(self, fin: list[str]) -> None:
        """`fin` are FINISHING stale samples: copy to stale.log, then mark DONE."""
        with self._cv:
            items = [(sid, self._entries[sid].version, self._entries[sid].data) for sid in fin]
        try:
            self.stale_log.append(items)
        except BaseException:
            self._undo_finish(fin)
            raise
        self._finish(fin, "stale_total")

    def _sweep_stale(self) -> int:
        if self.max_staleness is None:
            return 0
        with self._cv:
            ids = [sid for sid, e in self._entries.items()
                   if e.state == QUEUED and self._is_stale_version(e.version)]
            fin, _, _ = self._begin_finish_locked(ids)
        if fin:
            self._move_aside(fin)
        return len(fin)

    def set_policy_version(self, version: int) -> int:
        """Durably records the trainer's version; moves queued too-stale samples aside and
        returns how many. The last announcement wins (a version may go down: a rollback);
        concurrent announcements are ordered, so the version in memory is the WAL's last."""
        payload = pb.PolicyVersion(version=version).SerializeToString()
        with self._policy_lock:
            self.wal.append([(RecordType.POLICY, payload)])
            with self._cv:
                self.policy_version = int(version)
        return self._sweep_stale()

    # ------------------------------------------------------------------ compaction
    def maybe_compact(self, force: bool = False) -> int:
        """Compacts the WAL when at most half of the newly sealed segments is live, or with
        `force` (`Compactor.maybe_compact`); returns the bytes reclaimed."""
        return self._compactor.maybe_compact(force)

    def _live_wal_bytes(self, upto: int) -> int:
        """The WAL bytes of the held samples pushed into segments ≤ `upto`."""
        with self._cv:
            return sum(e.wal_bytes for e in self._entries.values() if e.seg <= upto)

    # ------------------------------------------------------------------ stats / close
    def largest_sample_bytes(self) -> int:
        """The size of the largest sample held (queued, leased or finishing); 0 when empty."""
        with self._cv:
            return max((len(e.data) for e in self._entries.values()), default=0)

    def stats(self) -> dict[str, int]:
        with self._cv:
            self._expire_locked(time.monotonic())
            out = {"queued": self.queued, "leased": self.leased, "bytes": self.bytes,
                   "policy_version": self.policy_version, "max_bytes": self.max_bytes}
            for name in ("acked_total", "pushed_total", "duplicates_total", "stale_total",
                         "nacked_total", "expired_total", "backpressure_total",
                         "unknown_acks_total"):
                out[name] = self.counters[name]
        out["wal_segments"] = len(self.wal.segments())
        out["wal_bytes"] = self.wal.disk_bytes()
        out["compactions_total"] = self.wal.compactions_total
        out["fsyncs_total"] = self.wal.fsyncs_total
        return out

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._stop.set()
        self._compactor.join()
        self.wal.close()
        with self._cv:
            self._cv.notify_all()
