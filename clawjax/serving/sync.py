"""Synchronous wrappers for non-async callers (the trainer, the publisher, scripts).

`SyncFleet(urls, **fleet_kwargs)` runs a `Fleet` on a private event loop in a daemon thread;
its methods block (each with the fleet's own timeouts). `run(coro)` runs any coroutine there.
`run_on(fleet, coro)` runs a coroutine on an async `Fleet` that lives on another thread's loop.
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, Sequence

from clawjax.loop_thread import LoopThread
from clawjax.serving.fleet import Fleet


def run_on(fleet: Fleet, coro: Coroutine, timeout: float | None = None) -> Any:
    """Runs `coro` on `fleet`'s loop (started elsewhere) and waits for its result."""
    if fleet.loop is None or not fleet.loop.is_running():
        coro.close()
        raise RuntimeError("fleet is not started on a running event loop")
    return asyncio.run_coroutine_threadsafe(coro, fleet.loop).result(timeout)


class SyncFleet:
    """A started `Fleet` on its own loop thread. Usage:

        fleet = SyncFleet(["http://127.0.0.1:30000"])
        out = fleet.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4})
        fleet.close()
    """

    def __init__(self, urls: Sequence[str], **fleet_kwargs):
        self._worker = LoopThread("clawjax-fleet")
        self.fleet: Fleet = self._worker.launch(self._start(list(urls), fleet_kwargs))

    @staticmethod
    async def _start(urls, kwargs) -> Fleet:
        return await Fleet(urls, **kwargs).start()

    def run(self, coro: Coroutine, timeout: float | None = None) -> Any:
        return self._worker.run(coro, timeout)

    def generate(self, *args, **kwargs) -> dict:
        return self.run(self.fleet.generate(*args, **kwargs))

    def generate_raw(self, body: dict) -> dict:
        return self.run(self.fleet.generate_raw(body))

    def chat_completions(self, body: dict) -> dict:
        return self.run(self.fleet.chat_completions(body))

    def teacher_logprobs(self, prompt_ids, response_ids, top_k: int = 0):
        return self.run(self.fleet.teacher_logprobs(prompt_ids, response_ids, top_k))

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None
                                 ) -> dict[str, dict]:
        return self.run(self.fleet.update_weights_from_disk(model_path, weight_version))

    def probe_all(self) -> list[bool]:
        async def probe():
            return await asyncio.gather(*(self.fleet.probe(s) for s in self.fleet.servers))
        return self.run(probe())

    def stats(self) -> dict:
        return self.fleet.stats()

    def close(self) -> None:
        if self._worker.running:
            self.run(self.fleet.aclose())
            self._worker.stop(timeout=10)

    def __enter__(self) -> "SyncFleet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
