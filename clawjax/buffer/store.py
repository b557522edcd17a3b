"""The buffer's state: a durable FIFO of serialized samples with leases, acks, staleness and a
byte capacity, rebuilt from the write-ahead log on open.

Every sample the store holds is in exactly one state:
  queued    deliverable (in the `_ready` deque, FIFO; nacked and expired leases go to the front)
  leased    handed to a consumer until `deadline` (monotonic seconds); invisible to others;
            `holder` is the consumer token of the request that leased it (None without one)
  finishing being acked or moved aside (the DONE record is being made durable)
and once the DONE record is durable its id moves to `_done` for good (pushes of it are ignored
as duplicates forever; it joins `_done` just before it leaves `_entries`, so a push never finds
it in neither). Compaction moves finished ids out of the WAL into `done.log`, written
once per id and never rewritten; the in-memory `DoneSet` and that file are the only things that
grow with the number of samples ever finished (about 16-22 bytes of memory and the id's length +
18 bytes of disk per id: the id and its 16-byte digest, which a restart loads without hashing).

Invariants:
- `push` returns only after every new sample is in the WAL and fsynced; a duplicate of an id whose
  first push is still in flight waits for that push to become durable.
- `bytes` (capacity) counts queued + leased + finishing samples: len(serialized Sample) each.
- Leases live only in memory: after a restart every unacked sample is queued again.
- A sample with policy_version < announced - max_staleness is never delivered: it is appended to
  `stale.log` (fsynced, at most once per id: `StaleOnce`), then marked DONE in the WAL, and
  counted in `stale_total`.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import os
import threading
import time

from clawjax.buffer import rollout_pb2 as pb
from clawjax.buffer.compaction import DoneLog, carry_over, done_records
from clawjax.buffer.consumer import may_touch
from clawjax.buffer.done_set import DoneSet, digests
from clawjax.buffer.stale import StaleOnce
from clawjax.buffer.wal import RecordType, WriteAheadLog, decode_push, encode_push

log = logging.getLogger(__name__)

QUEUED, LEASED, FINISHING = 0, 1, 2


class BufferFull(Exception):
    """A push would exceed `max_bytes`; retry after `retry_after_s`."""

    def __init__(self, needed: int, used: int, max_bytes: int, retry_after_s: float):
        self.retry_after_s = retry_after_s
        super().__init__(f"buffer full: push of {needed} bytes with {used} of max_bytes={max_bytes}"
                         f" in use; retry after {retry_after_s:.2f} s")


class BatchTooLarge(ValueError):
    """A single push is larger than the whole capacity: it can never succeed."""


class _Entry:
    __slots__ = ("data", "version", "seg", "state", "deadline", "owner", "holder", "wal_bytes")

    def __init__(self, data: bytes, version: int, seg: int):
        self.data, self.version, self.seg = data, version, seg
        self.state, self.deadline, self.owner, self.holder = QUEUED, 0.0, None, None
        self.wal_bytes = len(data) + 32


_NONE = _Entry(b"", 0, 0)


class Store:
    """Thread-safe buffer state over a `WriteAheadLog` in `directory`."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int = 1 << 30,
                 lease_timeout_s: float = 60.0, max_staleness: int | None = None,
                 segment_bytes: int = 64 << 20, fsync: bool = True,
                 compact_interval_s: float = 1.0, retry_after_s: float = 0.2):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes = {max_bytes}, expected a positive byte count")
        if not (math.isfinite(lease_timeout_s) and lease_timeout_s > 0):  # NaN/inf: never
            raise ValueError(f"lease_timeout_s = {lease_timeout_s}, expected a finite number of "
                             "seconds > 0")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness = {max_staleness}, expected ≥ 0 or None")
        self.max_bytes, self.lease_timeout_s = int(max_bytes), float(lease_timeout_s)
        self.max_staleness, self.retry_after_s = max_staleness, retry_after_s
        self.compact_interval_s = compact_interval_s
        self._cv = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._ready: collections.deque[str] = collections.deque()
        self._done = DoneSet()
        self._inflight: dict[str, threading.Event] = {}    # pushes being made durable
        self._finishing: dict[str, threading.Event] = {}   # DONE records being made durable
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._owners: collections.Counter[str] = collections.Counter()
        self.queued = self.leased = self.bytes = self._reserved = 0
        self.policy_version = 0
        self.counters = collections.Counter()
        self._compacted_upto = 0
        self._closed = False   # set by close(): waiting leases and slot waits return at once
        self._policy_lock = threading.Lock()   # orders policy announcements: WAL == memory
        self.wal = WriteAheadLog(directory, segment_bytes=segment_bytes, fsync=fsync)
        self.stale_log = StaleOnce(directory, fsync=fsync)
        self.done_log = DoneLog(directory, fsync=fsync)
        self._replay()
        self.stale_log.recover(self._entries)
        self._stop = threading.Event()
        self._compactor = threading.Thread(target=self._compact_loop, name="wal-compactor",
                                           daemon=True)
        self._compactor.start()
        self._sweep_stale()

    # ------------------------------------------------------------------ recovery
    def _replay(self) -> None:
        """A live sample is the first PUSH of an id that no DONE record (in done.log or the WAL)
        names. A push of a finished id is refused before it is logged, so an id's PUSH records
        all precede its DONE in the WAL: a DONE drops the entries it names as it is read, and
        the ids of done.log (whose PUSH records a crash inside a compaction can leave in the
        WAL) are dropped once, at the end, in one `contains_many`. done.log's stored digests
        go into the finished set in one bulk merge (`DoneSet.merge_packed`)."""
        self._done.merge_packed(self.done_log.key_chunks())
        for seg, rtype, payload in self.wal.replay():
            if rtype == RecordType.PUSH:
                sid, version, data = decode_push(payload)
                if sid not in self._entries:
                    self._entries[sid] = _Entry(data, version, seg)
            elif rtype == RecordType.DONE:
                ids = pb.SampleIds.FromString(payload).sample_ids
                for sid in ids:
                    self._entries.pop(sid, None)
                self._done.update(ids)
                self._done.consolidate()
            elif rtype == RecordType.POLICY:
                self.policy_version = pb.PolicyVersion.FromString(payload).version
        ids = list(self._entries)
        for sid, finished in zip(ids, self._done.contains_many(ids)):
            if finished:
                del self._entries[sid]
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
                        self._entries[sid] = _Entry(kept[i], version, seg)
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
    def _expire_locked(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, sid = heapq.heappop(heap)
            e = self._entries.get(sid)
            if e is not None and e.state == LEASED and e.deadline == deadline:
                self._unlease_locked(e)
                e.state = QUEUED
                self._ready.appendleft(sid)
                self.queued += 1
                self.counters["expired_total"] += 1
                self._cv.notify_all()

    def _unlease_locked(self, e: _Entry) -> None:
        self.leased -= 1
        if e.owner is not None:
            self._owners[e.owner] -= 1
            if self._owners[e.owner] <= 0:
                del self._owners[e.owner]
        e.owner = e.holder = None

    def _wait_locked(self, until: float) -> None:
        """Waits on the condition until `until`, waking early for the next lease expiry."""
        now = time.monotonic()
        wake = until if not self._heap else min(until, self._heap[0][0])
        if wake > now:
            self._cv.wait(wake - now)
        self._expire_locked(time.monotonic())

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

    def in_flight(self, owner: str) -> int:
        with self._cv:
            self._expire_locked(time.monotonic())
            return self._owners.get(owner, 0)

    def wait_for_slot(self, owner: str, max_in_flight: int, timeout_s: float) -> bool:
        """Waits until `owner` holds fewer than `max_in_flight` leases (True) or timeout (False)."""
        until = time.monotonic() + timeout_s
        with self._cv:
            self._expire_locked(time.monotonic())
            while self._owners.get(owner, 0) >= max_in_flight:
                if time.monotonic() >= until or self._closed:
                    return False
                self._wait_locked(until)
            return True

    def extend(self, ids: list[str], lease_timeout_s: float = 0.0, holder: str | None = None
               ) -> tuple[list[str], list[str]]:
        """Moves the deadline of each id still leased to `holder` (`consumer.may_touch`) to
        now + lease_timeout_s (default: the store's); returns (extended, lost). An id leased
        to another consumer (ours expired and it was redelivered) is lost to us."""
        length = lease_timeout_s if lease_timeout_s > 0 else self.lease_timeout_s
        extended, lost = [], []
        with self._cv:
            now = time.monotonic()
            self._expire_locked(now)
            for sid in ids:
                e = self._entries.get(sid)
                if e is None or e.state != LEASED or not may_touch(e.holder, holder):
                    lost.append(sid)
                    continue
                e.deadline = now + length
                heapq.heappush(self._heap, (e.deadline, next(self._seq), sid))
                extended.append(sid)
        return extended, lost

    def nack(self, ids: list[str], holder: str | None = None) -> tuple[int, int]:
        """Returns ids leased to `holder` (`consumer.may_touch`) to the front of the queue;
        returns (requeued, unknown). An id leased to another consumer is left alone and counted
        unknown: a late nack after our lease expired must not take it from its new holder."""
        requeued = unknown = 0
        with self._cv:
            self._expire_locked(time.monotonic())
            for sid in dict.fromkeys(ids):
                e = self._entries.get(sid)
                if e is None or e.state != LEASED or not may_touch(e.holder, holder):
                    unknown += 1
                    continue
                self._unlease_locked(e)
                e.state = QUEUED
                self._ready.appendleft(sid)
                self.queued += 1
                requeued += 1
            self.counters["nacked_total"] += requeued
            self.counters["unknown_acks_total"] += unknown
            self._cv.notify_all()
        return requeued, unknown

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
        """Compacts when segments were sealed since the last compaction and at most half of
        their bytes are still live (or `force`); returns the bytes reclaimed."""
        sealed = self.wal.sealed()
        if not sealed or (sealed[-1] <= self._compacted_upto and not force):
            return 0
        if not force:
            size = sum(self.wal._path(n).stat().st_size for n in sealed)
            with self._cv:
                live = sum(e.wal_bytes for e in self._entries.values() if e.seg <= sealed[-1])
            if live > size // 2:
                return 0
        def keep(records):
            # The live done set, not a copy (ids join it only once their DONE is durable), and
            # the finished ids made durable in done.log before the segments holding them go.
            compacted = carry_over(records, self._done)
            self.done_log.append(compacted.finished)
            return compacted.records

        reclaimed = self.wal.compact(keep)
        self._compacted_upto = sealed[-1]
        log.info("WAL compaction reclaimed %d bytes", reclaimed)
        return reclaimed

    def _compact_loop(self) -> None:
        while not self._stop.wait(self.compact_interval_s):
            try:
                self._done.consolidate()
                self.maybe_compact()
            except Exception:  # keep serving; the next round retries
                log.exception("WAL compaction failed")

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
