"""The store's in-memory half: every held sample's entry and state, the FIFO of queued ids, and
the leases with their expiry heap. Nothing here touches the disk: leases live only in memory
(after a restart every unacked sample is queued again). `Store` (store.py) is a `LeaseTable`
and adds the durable transitions (push, ack, moving stale samples aside) under the same lock.

A held sample's `Entry` is in one state: QUEUED (its id is in `_ready`), LEASED (until
`deadline`, monotonic seconds; `owner` counts it against a Stream's in-flight leases, `holder`
is the consumer token that alone may nack or extend it) or FINISHING (its DONE record is being
made durable; see store.py).

Invariants:
- Whenever `_cv` is free, `queued` and `leased` count the entries QUEUED and LEASED and
  `_owners[o]` the LEASED entries whose owner is `o` (absent at 0). `_ready` holds every
  QUEUED id, and may hold ids no longer QUEUED: readers skip them.
- Methods named `*_locked` run with `_cv` held; the others take it.
- A lease ends by expiry at its deadline (back to the front of the queue), nack (the same), or
  ack; a heap item whose deadline no longer matches its entry's (extended, or no longer
  LEASED) is dropped when it comes due.
- Nack and extend move a lease only for its holder (`consumer.may_touch`).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import threading
import time

from clawjax.buffer.consumer import may_touch

QUEUED, LEASED, FINISHING = 0, 1, 2


class Entry:
    """One held sample: its serialized bytes, policy version, the WAL segment of its PUSH, its
    state and lease; `wal_bytes` estimates its PUSH record's size on disk (for compaction)."""
    __slots__ = ("data", "version", "seg", "state", "deadline", "owner", "holder", "wal_bytes")

    def __init__(self, data: bytes, version: int, seg: int):
        self.data, self.version, self.seg = data, version, seg
        self.state, self.deadline, self.owner, self.holder = QUEUED, 0.0, None, None
        self.wal_bytes = len(data) + 32


class LeaseTable:
    """Held samples, their states and their leases, guarded by `_cv`."""

    def __init__(self, lease_timeout_s: float):
        self.lease_timeout_s = float(lease_timeout_s)
        self._cv = threading.Condition()
        self._entries: dict[str, Entry] = {}
        self._ready: collections.deque[str] = collections.deque()
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._owners: collections.Counter[str] = collections.Counter()
        self.queued = self.leased = 0
        self.counters = collections.Counter()
        self._closed = False   # set by close(): waiting leases and slot waits return at once

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

    def _unlease_locked(self, e: Entry) -> None:
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
