"""When the store compacts its WAL, and the background thread that checks every
`compact_interval_s`. What a compaction keeps is `compaction.carry_over`'s call; how sealed
segments are rewritten, `WriteAheadLog.compact`'s.

Invariants:
- A compaction runs when segments were sealed since the last one and at most half of their
  bytes are still live (held samples pushed into them), or when forced.
- The finished ids a compaction drops from the WAL are durable in done.log before the segments
  that held them are replaced. The done set it tests is the store's live one, not a copy: ids
  join it only once their DONE record is durable.
- A failed round is logged and retried the next round; the store keeps serving meanwhile.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from clawjax.buffer.compaction import DoneLog, carry_over
from clawjax.buffer.done_set import DoneSet
from clawjax.buffer.wal import WriteAheadLog

log = logging.getLogger(__name__)


class Compactor:
    """Compacts `wal` for a store whose finished ids are `done` and whose WAL bytes still live
    in segments ≤ n are `live_bytes(n)`. Once started, a thread consolidates `done` and calls
    `maybe_compact` every `interval_s` until `stop` is set."""

    def __init__(self, wal: WriteAheadLog, done: DoneSet, done_log: DoneLog,
                 live_bytes: Callable[[int], int], interval_s: float, stop: threading.Event):
        self.wal, self.done, self.done_log = wal, done, done_log
        self._live_bytes = live_bytes
        self.interval_s = interval_s
        self._stop = stop
        self._compacted_upto = 0
        self._thread = threading.Thread(target=self._loop, name="wal-compactor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def maybe_compact(self, force: bool = False) -> int:
        """Compacts when segments were sealed since the last compaction and at most half of
        their bytes are still live (or `force`); returns the bytes reclaimed."""
        sealed = self.wal.sealed()
        if not sealed or (sealed[-1] <= self._compacted_upto and not force):
            return 0
        if not force:
            size = sum(self.wal._path(n).stat().st_size for n in sealed)
            if self._live_bytes(sealed[-1]) > size // 2:
                return 0
        def keep(records):
            # The live done set, not a copy (ids join it only once their DONE is durable), and
            # the finished ids made durable in done.log before the segments holding them go.
            compacted = carry_over(records, self.done)
            self.done_log.append(compacted.finished)
            return compacted.records

        reclaimed = self.wal.compact(keep)
        self._compacted_upto = sealed[-1]
        log.info("WAL compaction reclaimed %d bytes", reclaimed)
        return reclaimed

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.done.consolidate()
                self.maybe_compact()
            except Exception:  # keep serving; the next round retries
                log.exception("WAL compaction failed")
