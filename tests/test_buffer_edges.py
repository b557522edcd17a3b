"""The buffer at its edges: client arguments that no retry can fix fail at once (and arguments
the server clamps work as it does); long waits (Stream, a long-poll Lease) never take every
server thread, so pushes, acks and stats go on while consumers wait; a stream that stops part
way through a batch gives the rest back; a lease length that would never expire is refused; a
server started again after stop() streams again."""

import subprocess
import sys
import threading

import numpy as np
import pytest

from clawjax.buffer import BufferClient, BufferServer, RolloutBufferError
from clawjax.buffer import client as client_mod
from clawjax.buffer import server as server_mod
from clawjax.sample import Sample


def _sample(sid: str) -> Sample:
    return Sample(sid, np.arange(12) % 97, 4, rollout_logp=np.full(4, -0.5))


@pytest.fixture
def served(tmp_path):
    with BufferServer(tmp_path / "buf", lease_timeout_s=30) as server, \
            BufferClient(server.address, retry_budget_s=5, rpc_timeout_s=5) as client:
        yield server, client


@pytest.mark.parametrize("timeout_s", [-100.0, float("inf")])
def test_a_lease_timeout_the_server_clamps_is_served_not_retried_until_the_budget(
        served, timeout_s):
    """The server reads a negative wait as 0 and caps a long one; the client must not turn
    them into an RPC deadline already past (DEADLINE_EXCEEDED, retried, then 'unavailable')."""
    _, client = served
    client.push([_sample("a")])
    assert [s.sample_id for s in client.lease(1, timeout_s=timeout_s)] == ["a"]


def test_bad_lease_and_stream_arguments_fail_at_once_naming_the_field(served):
    _, client = served
    with pytest.raises(ValueError, match=r"timeout_s = nan, expected"):
        client.lease(1, timeout_s=float("nan"))
    with pytest.raises(ValueError, match=r"max_samples = -1, expected"):
        client.lease(-1)
    with pytest.raises(ValueError, match=r"max_in_flight = -2, expected"):
        next(client.stream(max_in_flight=-2))
    assert (client_mod.MAX_WAIT_S, client_mod.MAX_LEASE_SAMPLES) == (
        server_mod.MAX_WAIT_S, server_mod.MAX_LEASE_SAMPLES)


def test_a_server_needs_a_thread_beyond_those_that_wait(tmp_path):
    with pytest.raises(ValueError, match=r"max_workers = 1, expected an integer ≥ 2"):
        BufferServer(tmp_path / "buf", max_workers=1)


def test_streams_on_every_server_thread_leave_room_for_push_ack_and_stats(tmp_path):
    """As many open streams as the server has threads: pushes, acks and stats still run (they
    used to wait behind the streams, which waited for pushes: a deadlock until the deadline)."""
    workers = 4
    with BufferServer(tmp_path / "buf", max_workers=workers) as server, \
            BufferClient(server.address, retry_budget_s=10, rpc_timeout_s=5) as client:
        client.push([_sample(f"s{i}") for i in range(workers)])
        streams = [BufferClient(server.address, retry_budget_s=30) for _ in range(workers)]
        got: list[str] = []
        lock = threading.Lock()

        def consume(c: BufferClient) -> None:
            try:
                for s in c.stream(max_in_flight=1):
                    with lock:
                        got.append(s.sample_id)
            except (RolloutBufferError, ValueError):
                pass   # the channel closed under it at the end of the test

        threads = [threading.Thread(target=consume, args=(c,), daemon=True) for c in streams]
        for t in threads:
            t.start()
        for _ in range(200):   # the streams hold their leases: every stream thread is busy
            if server.store.stats()["leased"] >= workers - 1:
                break
            threading.Event().wait(0.025)
        try:
            assert client.push([_sample("late")]).accepted == 1
            stats = client.stats()
            assert stats["pushed_total"] == workers + 1
            with lock:
                first = list(got)
            assert first and client.ack(first) == len(first)
        finally:
            for c in streams:
                c.close()
            for t in threads:
                t.join(10)


@pytest.mark.parametrize("stop", ["max_samples", "close"])
def test_samples_a_stream_received_but_never_handed_out_are_given_back(served, stop):
    """A stream that stops part way through a batch (max_samples reached, or the caller closes
    it) nacks the rest of the batch: they are deliverable at once, not hidden until their
    lease (30 s here) expires."""
    _, client = served
    client.push([_sample(f"b{i}") for i in range(5)])
    if stop == "max_samples":
        taken = [s.sample_id for s in client.stream(max_in_flight=5, max_samples=2)]
    else:
        stream = client.stream(max_in_flight=5)
        taken = [next(stream).sample_id, next(stream).sample_id]
        stream.close()
    assert len(taken) == 2
    rest = [s.sample_id for s in client.lease(10, timeout_s=2)]
    assert sorted(taken + rest) == [f"b{i}" for i in range(5)]


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_lease_timeout_that_would_never_expire_is_refused_at_start(tmp_path, value):
    """`--lease-timeout-s nan` (or inf) made every lease last forever: a consumer that died
    held its samples until the next restart."""
    with pytest.raises(ValueError, match=rf"lease_timeout_s = {value}, expected a finite"):
        BufferServer(tmp_path / "a", lease_timeout_s=float(value)).start()
    proc = subprocess.run([sys.executable, "-m", "clawjax.buffer", "serve", "--port", "0",
                           "--dir", str(tmp_path / "b"), "--lease-timeout-s", value],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"lease_timeout_s = {value}" in proc.stderr, proc.stderr


def test_a_server_started_again_after_stop_streams_again(tmp_path):
    """`stop()` then `start()` on the same `BufferServer`: its streams used to end at once
    (the stop flag stayed set), and a client reconnected in a loop and never got a sample."""
    server = BufferServer(tmp_path / "buf")
    server.start()
    server.stop()
    port = server.start()
    got: list[str] = []
    try:
        with BufferClient(f"127.0.0.1:{port}", retry_budget_s=10) as client:
            client.push([_sample("again")])
            stream = client.stream(max_in_flight=1, max_samples=1)
            thread = threading.Thread(target=lambda: got.extend(s.sample_id for s in stream),
                                      daemon=True)
            thread.start()
            thread.join(20)
    finally:
        server.stop()
    assert got == ["again"]
