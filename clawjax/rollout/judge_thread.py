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

from typing import Awaitable, Callable, Sequence

from clawjax.loop_thread import LoopThread
from clawjax.rollout.judge_loop import JudgeLoop

# build() runs on the judge thread's loop; returns the loop to drive and async closers (run there
# in reverse order on aclose).
Build = Callable[[], Awaitable[tuple[JudgeLoop, list[Callable[[], Awaitable[None]]]]]]


class JudgeThread:
    """A `JudgeLoop` (and the clients it uses) running on a private event loop in a daemon
    thread. `build` is an async factory run on that loop (see `Build`)."""

    def __init__(self, build: Build, name: str = "clawjax-judge"):
        self._build = build
        self._worker = LoopThread(name)
        self.inner: JudgeLoop | None = None
        self._closers: list = []

    def start(self, timeout: float = 120.0) -> "JudgeThread":
        """Starts the thread and builds the loop's components on it (blocking, at most
        `timeout` s); a failing `build` raises here and leaves no thread running."""
        self.inner, self._closers = self._worker.launch(self._build(), timeout)
        return self

    # --- what the serving loop calls ---------------------------------------------------------
    def handle(self, events: Sequence) -> None:
        """Hands session events to the judge loop; returns at once."""
        if events:
            self._worker.call_soon(self.inner.handle, list(events))

    def drop(self, reason: str) -> None:
        """Counts one dropped turn (counters are only written on the judge thread)."""
        self._worker.call_soon(self.inner.drop, reason)

    @property
    def busy(self) -> int:
        """Turns being judged (a snapshot; exact once `idle` returned True)."""
        return self.inner.busy

    async def idle(self, timeout: float = 30.0) -> bool:
        """Waits (without blocking the caller's loop) until every event handed over so far is
        judged and pushed; False on timeout."""
        # Queued behind every handle() made before it: events handed over are seen first.
        return await self._worker.arun(self.inner.idle(timeout))

    async def aclose(self) -> None:
        """Runs the closers on the judge loop, then stops the thread."""
        async def close_all() -> None:
            for close in reversed(self._closers):
                await close()

        if self._worker.running:
            await self._worker.arun(close_all())
            await self._worker.astop()
