"""Backpressure from the trainer to the default run's simulated agents: `backlog_limit` from
the config, and `wait_for_room` against a real buffer server on loopback (it waits while the
buffer holds `limit` queued samples and returns once the trainer acks one)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from clawjax.buffer import BufferClient, BufferServer
from clawjax.config import base_config
from clawjax.default_run import backlog_limit
from clawjax.rollout.agents import wait_for_room
from clawjax.sample import Sample


def sample(i: int) -> Sample:
    return Sample(f"s{i}", np.arange(8), 4, rollout_logp=np.full(4, -0.5))


@pytest.mark.parametrize("max_staleness,publish_every,per_step,expected", [
    (4, 2, 16, 32),     # the default run: 2 steps of samples
    (4, 0, 16, 48),     # never publishing counts as a lag of 1
    (2, 2, 16, 16),     # at least one step's worth
    (-1, 2, 16, None),  # unbounded staleness: no limit
])
def test_backlog_limit(max_staleness, publish_every, per_step, expected):
    c = base_config()
    c.trainer.max_staleness = max_staleness
    c.publish.every_steps = publish_every
    c.trainer.samples_per_step = per_step
    assert backlog_limit(c) == expected


@pytest.fixture
def buffer(tmp_path):
    server = BufferServer(tmp_path, fsync=False)
    address = f"127.0.0.1:{server.start()}"
    with BufferClient(address) as client:
        yield client
    server.stop()


def test_waits_while_the_buffer_is_full_and_resumes_after_an_ack(buffer):
    queued = lambda: buffer.stats()["queued"]
    stop = threading.Event()
    assert wait_for_room(queued, 3, stop) < 0.5  # empty buffer: no wait
    buffer.push([sample(i) for i in range(3)])
    done = threading.Event()
    waited: list[float] = []
    thread = threading.Thread(target=lambda: (waited.append(wait_for_room(queued, 3, stop)),
                                              done.set()))
    thread.start()
    assert not done.wait(0.5), "returned while 3 samples were queued"
    leased = buffer.lease(1, timeout_s=5)
    buffer.ack([s.sample_id for s in leased])
    assert done.wait(10), "still waiting after the trainer acked a sample"
    thread.join()
    assert waited[0] >= 0.5


def test_stop_and_a_failing_buffer_end_the_wait():
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    start = time.monotonic()
    wait_for_room(lambda: 10, 3, stop)
    assert 0.25 <= time.monotonic() - start < 5

    def broken():
        raise ConnectionError("buffer restarting")

    assert wait_for_room(broken, 3, threading.Event()) < 0.5
