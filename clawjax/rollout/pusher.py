"""`Pusher`: the rollout side's batched, never-dropping push of samples to the buffer.

Samples built by `clawjax.rollout.emit` wait in a bounded asyncio queue; one task takes up to
`batch` of them (waiting at most `linger_s` for a batch to fill) and pushes them with the
synchronous `BufferClient.push` in a worker thread. A failed push is retried with backoff; a
batch the buffer refuses as invalid, or one holding a sample that cannot be encoded for the wire
(`SampleError`, e.g. a string without a UTF-8 encoding), is split so only the bad samples are
dropped (counted as `invalid` in `emit.Stats`): such a batch is never retried as is, so one bad
sample never holds back the samples after it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from clawjax.rollout.emit import Stats
from clawjax.sample import Sample, SampleError

log = logging.getLogger(__name__)


class Pusher:
    """Pushes samples to the buffer in batches from a bounded queue (`maxsize` samples:
    `put` waits when it is full). A failed push is logged and retried with backoff, never
    dropped; a batch the buffer refuses as invalid, or that cannot be encoded (`SampleError`), is
    retried one sample at a time and only the bad samples are dropped (counted as `invalid`).
    `client.push` is the synchronous `BufferClient.push`, run in a worker thread."""

    def __init__(self, client, stats: Stats, *, batch: int = 64, maxsize: int = 4096,
                 linger_s: float = 0.01, backoff_s: float = 0.2, backoff_max_s: float = 5.0):
        self.client, self.stats = client, stats
        self.batch, self.linger_s = batch, linger_s
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.queue: asyncio.Queue[Sample] = asyncio.Queue(maxsize)
        self._task: asyncio.Task | None = None
        self._busy = 0

    def start(self) -> "Pusher":
        self._task = asyncio.create_task(self._run(), name="buffer-pusher")
        return self

    async def put(self, sample: Sample) -> None:
        await self.queue.put(sample)
        self.stats.push["queued"] = self.queue.qsize()

    async def drain(self, timeout: float = 30.0) -> bool:
        """Waits until every queued sample is pushed; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.queue.qsize() or self._busy:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            first = await self.queue.get()
            self._busy = 1
            batch = [first]
            deadline = time.monotonic() + self.linger_s
            while len(batch) < self.batch:
                try:
                    batch.append(self.queue.get_nowait())
                except asyncio.QueueEmpty:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    await asyncio.sleep(min(left, 0.002))
            self.stats.push["queued"] = self.queue.qsize()
            await self._push(batch)
            self._busy = 0

    async def _push(self, batch: list[Sample]) -> None:
        from clawjax.buffer.errors import InvalidSampleError
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                res = await loop.run_in_executor(None, self.client.push, batch)
                self.stats.push["pushed"] += res.accepted
                self.stats.push["duplicates"] += res.duplicates
                self.stats.push["batches"] += 1
                return
            except (InvalidSampleError, SampleError) as e:
                await self._refused(batch, e)
                return
            except Exception as e:  # noqa: BLE001 - never drop: log, back off, retry
                self.stats.push["failures"] += 1
                delay = min(self.backoff_s * 2 ** attempt, self.backoff_max_s)
                log.warning("buffer push of %d samples failed (retry in %.1fs): %s",
                            len(batch), delay, e)
                attempt += 1
                await asyncio.sleep(delay)

    async def _refused(self, batch: list[Sample], error: Exception) -> None:
        """`batch` can never be stored as it is (the buffer refused it as invalid, or a sample
        cannot be encoded): a lone sample is dropped and counted as `invalid` (and no longer as
        emitted, when its kind is one counted there); several are pushed one at a time, so only
        the bad ones are dropped. Never raises: the pusher task must outlive any sample."""
        if len(batch) > 1:
            for sample in batch:
                await self._push([sample])
            return
        log.error("dropped sample %r, refused: %s", batch[0].sample_id, error)
        self.stats.drops["invalid"] += 1
        if batch[0].kind in self.stats.emitted:  # a bad kind may be why it was refused
            self.stats.emitted[batch[0].kind] -= 1
