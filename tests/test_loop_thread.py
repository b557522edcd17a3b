"""LoopThread: coroutines and callbacks run on its one thread, results and errors come back,
calls from its own thread fail loudly instead of deadlocking, stop is clean and idempotent."""

import asyncio
import threading

import pytest

from clawjax.loop_thread import LoopThread


def test_run_returns_results_and_raises_errors_from_the_loop_thread():
    worker = LoopThread("test-loop").start()
    try:
        async def where():
            await asyncio.sleep(0)
            return threading.current_thread().name, asyncio.get_running_loop()

        name, loop = worker.run(where(), timeout=10)
        assert name == "test-loop" and loop is worker.loop

        async def boom():
            raise ValueError("from the loop")

        with pytest.raises(ValueError, match="from the loop"):
            worker.run(boom(), timeout=10)
        with pytest.raises(TimeoutError):
            worker.run(asyncio.sleep(5), timeout=0.05)
    finally:
        worker.stop()
    assert not worker.running and worker.loop.is_closed()


def test_call_soon_keeps_order_and_arun_awaits_from_another_loop():
    worker = LoopThread("test-loop").start()
    seen, threads = [], set()

    def note(i):
        seen.append(i)
        threads.add(threading.current_thread().name)

    for i in range(200):
        worker.call_soon(note, i)

    async def count():
        return len(seen)

    async def main():   # another event loop awaits without blocking its own callbacks
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        ticker = asyncio.create_task(tick())
        n = await worker.arun(count())
        await worker.arun(asyncio.sleep(0.05))
        ticker.cancel()
        return n, ticks

    n, ticks = asyncio.run(main())
    worker.stop()
    assert n == 200 and seen == list(range(200)) and threads == {"test-loop"}
    assert ticks > 5


def test_run_from_the_loops_own_thread_raises_instead_of_deadlocking():
    worker = LoopThread("test-loop").start()

    async def nested():
        with pytest.raises(RuntimeError, match="would deadlock"):
            worker.run(asyncio.sleep(0))
        return "ok"

    assert worker.run(nested(), timeout=10) == "ok"
    worker.stop()


def test_stop_is_idempotent_and_run_after_stop_is_refused():
    never_started = LoopThread("test-loop")
    never_started.stop()
    assert never_started.loop.is_closed()
    worker = LoopThread("test-loop").start()
    worker.stop()
    worker.stop()
    with pytest.raises(RuntimeError, match="not running"):
        worker.run(asyncio.sleep(0))


def test_astop_from_another_loop():
    worker = LoopThread("test-loop").start()
    asyncio.run(worker.astop())
    assert not worker.running and worker.loop.is_closed()


def test_launch_returns_the_setup_result_and_a_failed_setup_stops_the_thread():
    async def setup():
        return threading.current_thread().name

    worker = LoopThread("test-loop")
    assert worker.launch(setup(), timeout=10) == "test-loop" and worker.running
    worker.stop()

    async def broken():
        raise OSError("address in use")

    failed = LoopThread("test-loop")
    with pytest.raises(OSError, match="address in use"):
        failed.launch(broken(), timeout=10)
    assert not failed.running and failed.loop.is_closed()
