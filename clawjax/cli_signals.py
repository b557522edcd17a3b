"""Serve until SIGINT / SIGTERM, then shut down: the shared tail of the serving command lines
(`python -m clawjax.serve`, `python -m clawjax.rollout serve`,
`python -m clawjax.rollout.rule_judge`).

Imports asyncio, os and signal only; aiohttp is imported when `serve_app_until_signal` runs.
Synchronous mains (the buffer server, the trainer) use `record_stop_signals` instead.

Contract, the same for every caller: start the server; print `READY http://HOST:PORT` (flushed:
the tests and `clawjax.local_stack` wait for that line); wait until SIGINT or SIGTERM reaches
the running event loop; then await the server's own shutdown and return normally, so `main`
returns 0 and the process exits 0. A start that raises propagates (nothing is printed and no
shutdown runs).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

Close = Callable[[], Awaitable[Any]]

# The --log-level choices of every command line (parsed with `type=str.lower`: INFO works too).
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def record_stop_signals(notice: str = "") -> list[int]:
    """For synchronous mains: installs SIGINT / SIGTERM handlers that only append the signal's
    number to the returned list (and write `notice`, formatted with `signum`, to stderr in one
    `os.write`); poll the list. The handlers take no lock, on purpose: Python runs a handler on
    the main thread between two bytecodes, possibly while that thread holds a lock, the
    handler's own included when a second signal lands inside the first handler. (A handler
    calling `threading.Event.set` hung the buffer server that way on a burst of SIGTERMs.)"""
    received: list[int] = []

    def note(signum, frame) -> None:
        received.append(signum)
        if notice:
            os.write(2, notice.format(signum=signum).encode())

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, note)
    return received


async def wait_for_signal() -> None:
    """Returns once SIGINT or SIGTERM arrives; installs the handlers on the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_until_signal(start: Callable[[], Awaitable[Close]], host: str, port: int) -> None:
    """Awaits `start()` (which returns the server's async `close`), prints
    `READY http://host:port`, waits for SIGINT / SIGTERM, then awaits `close()`."""
    close = await start()
    print(f"READY http://{host}:{port}", flush=True)
    await wait_for_signal()
    await close()


async def serve_app_until_signal(app: Any, host: str, port: int, **runner_kwargs: Any) -> None:
    """`serve_until_signal` for an aiohttp `web.Application` on host:port: an `AppRunner(app,
    **runner_kwargs)` with one `TCPSite`, shut down by `runner.cleanup()`."""
    from aiohttp import web

    async def start() -> Close:
        runner = web.AppRunner(app, **runner_kwargs)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        return runner.cleanup

    await serve_until_signal(start, host, port)
