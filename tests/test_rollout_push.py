"""The buffer pusher against a real gRPC buffer: batches, retries while the buffer is down
(nothing dropped), and isolates a sample the buffer refuses."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from clawjax.buffer import BufferClient, BufferServer
from clawjax.rollout.emit import Stats
from clawjax.rollout.pusher import Pusher
from clawjax.sample import Sample
from clawjax.serving.launch import free_port


def sample(i: int, **changes) -> Sample:
    fields = dict(sample_id=f"p-{i}", tokens=np.arange(1, 9), response_len=3, reward=1.0,
                  rollout_logp=[-0.5, -1.0, -0.25], session_id="push", turn_index=i)
    return Sample(**{**fields, **changes})


def test_pushes_survive_a_buffer_that_starts_late(tmp_path):
    port = free_port()
    stats = Stats()
    client = BufferClient(f"127.0.0.1:{port}", retry_budget_s=0.3, backoff_initial_s=0.05)
    server = None

    async def main():
        nonlocal server
        pusher = Pusher(client, stats, batch=4, backoff_s=0.05, backoff_max_s=0.2).start()
        for i in range(10):
            await pusher.put(sample(i))
        deadline = time.monotonic() + 30
        while stats.push["failures"] < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert stats.push["failures"] >= 2 and stats.push["pushed"] == 0
        server = BufferServer(tmp_path, port=port, fsync=False)
        server.start()
        assert await pusher.drain(60)
        await pusher.aclose()

    try:
        asyncio.run(main())
        assert stats.push["pushed"] == 10 and stats.push["batches"] >= 3   # batches of ≤ 4
        got = BufferClient(f"127.0.0.1:{port}").lease(100, timeout_s=1)
        assert sorted(s.sample_id for s in got) == [f"p-{i}" for i in range(10)]
    finally:
        client.close()
        if server is not None:
            server.stop()


def test_a_refused_sample_is_isolated_and_counted(tmp_path):
    server = BufferServer(tmp_path, fsync=False, max_sample_tokens=16)
    port = server.start()
    stats = Stats()
    stats.emitted["rl"] = 3
    client = BufferClient(f"127.0.0.1:{port}")

    async def main():
        pusher = Pusher(client, stats, batch=8, linger_s=0.05).start()
        await pusher.put(sample(0))
        await pusher.put(sample(1, tokens=np.arange(1, 40)))   # over the buffer's token limit
        await pusher.put(sample(2))
        assert await pusher.drain(30)
        await pusher.aclose()

    try:
        asyncio.run(main())
        got = client.lease(100, timeout_s=1)
        assert sorted(s.sample_id for s in got) == ["p-0", "p-2"]
        assert stats.drops["invalid"] == 1 and stats.emitted["rl"] == 2
    finally:
        client.close()
        server.stop()


def test_a_sample_that_cannot_be_encoded_is_isolated_and_does_not_block_later_ones(tmp_path):
    """A sample the client cannot encode (a session id with a lone surrogate: no UTF-8) is
    dropped and counted like one the buffer refuses; the rest of its batch and every later
    sample still reach the buffer (it is not retried forever)."""
    server = BufferServer(tmp_path, fsync=False)
    port = server.start()
    stats = Stats()
    stats.emitted["rl"] = 4
    client = BufferClient(f"127.0.0.1:{port}")

    async def main():
        pusher = Pusher(client, stats, batch=8, linger_s=0.05, backoff_s=0.05,
                        backoff_max_s=0.1).start()
        for s in (sample(0), sample(1, session_id="push-\ud83d"), sample(2)):
            await pusher.put(s)
        assert await pusher.drain(10)
        await pusher.put(sample(3))
        assert await pusher.drain(10)
        await pusher.aclose()

    try:
        asyncio.run(main())
        got = client.lease(100, timeout_s=1)
        assert sorted(s.sample_id for s in got) == ["p-0", "p-2", "p-3"]
        assert stats.drops["invalid"] == 1 and stats.emitted["rl"] == 3
        assert stats.push["failures"] == 0
    finally:
        client.close()
        server.stop()
