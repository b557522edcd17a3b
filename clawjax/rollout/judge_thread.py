"""`JudgeThread`: the proxy's judge loop on its own event loop, in its own thread.

Serving and judging are separate loops (DESIGN.md): a chat request must never queue behind
judge votes, teacher calls or buffer pushes. On one event loop it does: every turn starts m PRM
votes and m hint votes (HTTP calls whose client-side CPU is several times the serving request's
own), and the loop runs ready callbacks in order, so at 32 concurrent sessions a chat request
waited for hundreds of them. Here the serving loop only hands events over
(`call_soon_threadsafe`, FIFO, so a session's events keep their order); the judge clients, the
teacher fleet and the buffer pusher are built on, and only ever used from, the judge thread's
loop. Python threads share the interpreter lock, but a thread waiting for it gets it within the
switch interval (or at the other's next system call), instead of after a whole queue.

Surface used by `Proxy` (the same as `JudgeLoop`'s): `handle(events)`, `drop(reason)`, `busy`,
`await idle(timeout)`; plus `start()` and `await aclose()`.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Awaitable, Callable, Sequence

from clawjax.rollout.emit import JudgeLoop

# build() runs on the judge thread's loop; returns the loop to drive and async closers (run there
# in reverse order on aclose).
Build = Callable[[], Awaitable[tuple[JudgeLoop, list[Callable[[], Awaitable[None]]]]]]


class JudgeThread:
    """A `JudgeLoop` (and the clients it uses) running on a private event loop in a daemon
    thread. `build` is an async factory run on that loop (see `Build`)."""

    def __init__(self, build: Build, name: str = "clawjax-judge"):
        self._build = build
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=name)
        self.inner: JudgeLoop | None = None
        self._closers: list = []

    def start(self, timeout: float = 120.0) -> "JudgeThread":
        """Starts the thread and builds the loop's components on it (blocking, at most
        `timeout` s); a failing `build` raises here and leaves no thread running."""
        self._thread.start()
        try:
            self.inner, self._closers = asyncio.run_coroutine_threadsafe(
                self._build(), self._loop).result(timeout)
        except BaseException:
            self._stop_thread()
            raise
        return self

    # --- what the serving loop calls ---------------------------------------------------------
    def handle(self, events: Sequence) -> None:
        """Hands session events to the judge loop; returns at once."""
        if events:
            self._loop.call_soon_threadsafe(self.inner.handle, list(events))

    def drop(self, reason: str) -> None:
        """Counts one dropped turn (counters are only written on the judge thread)."""
        self._loop.call_soon_threadsafe(self.inner.drop, reason)

    @property
    def busy(self) -> int:
        """Turns being judged (a snapshot; exact once `idle` returned True)."""
        return self.inner.busy

    async def idle(self, timeout: float = 30.0) -> bool:
        """Waits (without blocking the caller's loop) until every event handed over so far is
        judged and pushed; False on timeout."""
        # Queued behind every handle() made before it: events handed over are seen first.
        future = asyncio.run_coroutine_threadsafe(self.inner.idle(timeout), self._loop)
        return await asyncio.wrap_future(future)

    async def aclose(self) -> None:
        """Runs the closers on the judge loop, then stops the thread."""
        async def close_all() -> None:
            for close in reversed(self._closers):
                await close()

        if self._thread.is_alive():
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(close_all(), self._loop))
            await asyncio.get_running_loop().run_in_executor(None, self._stop_thread)

    def _stop_thread(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._loop.close()
