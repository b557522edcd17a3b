"""`LoopThread`: an asyncio event loop running in a daemon thread of its own.

The async parts of the house (the embedded server, the rollout proxy, the proxy's judge loop,
the fleet client) are driven this way from synchronous code (the trainer, the publisher, tests)
or from another event loop (the proxy's serving loop handing turns to the judge loop):

    worker = LoopThread("clawjax-fleet")
    fleet = worker.launch(make_fleet(), 60)  # starts the thread, runs the setup there; a
                                             # failed setup stops the thread again
    result = worker.run(coro, timeout=30)    # from another thread: blocks until the result
    result = await worker.arun(coro)         # from another event loop: awaits, never blocks it
    worker.call_soon(fn, *args)              # fire and forget; FIFO with other call_soon calls
    worker.stop()                            # stops the loop, joins the thread, closes the loop

Invariant: everything handed over runs on the one thread, so objects built by a coroutine given
to `run` (client sessions, servers) are only ever used on the loop that created them. `run` from
the loop's own thread would wait for itself forever: it raises instead.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Coroutine


class LoopThread:
    """A private event loop on a daemon thread named `name` (see the module docstring)."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, daemon=True, name=name)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def running(self) -> bool:
        """Started and not yet stopped."""
        return self._thread.is_alive()

    def start(self) -> "LoopThread":
        self._thread.start()
        return self

    def launch(self, setup: Coroutine, timeout: float | None = None) -> Any:
        """Starts the thread and runs `setup` on it (what the loop will serve: a server, a
        client pool); returns its result. If `setup` fails or times out, the thread is stopped
        before the error propagates, so a failed start leaves nothing running."""
        self.start()
        try:
            return self.run(setup, timeout)
        except BaseException:
            self.stop()
            raise

    def run(self, coro: Coroutine, timeout: float | None = None) -> Any:
        """Runs `coro` on the loop and returns its result (or raises its exception); waits at
        most `timeout` s (`TimeoutError`; the coroutine itself is not cancelled)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(f"{self._thread.name}: run() called from the loop's own thread "
                               "would deadlock; await the coroutine instead")
        if not self.running:
            coro.close()
            raise RuntimeError(f"{self._thread.name}: the loop thread is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def arun(self, coro: Coroutine) -> Any:
        """Runs `coro` on this loop and awaits its result from the caller's (another) loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def call_soon(self, fn: Callable, *args) -> None:
        """Schedules `fn(*args)` on the loop; calls run in the order they were made."""
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the loop after the callbacks already scheduled, joins the thread (at most
        `timeout` s) and closes the loop. Idempotent; safe on a thread never started."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()

    async def astop(self, timeout: float = 30.0) -> None:
        """`stop` from another event loop, without blocking it while the thread is joined."""
        await asyncio.get_running_loop().run_in_executor(None, self.stop, timeout)
