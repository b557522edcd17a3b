"""A buffer that stops answering (its process SIGSTOPped: a frozen host or a partition, the TCP
connection still open) holds no call past the client's retry budget (or the 5 s an attempt gets
at least): unary attempts are cut to the budget left (`attempt_timeout_s`), a Stream learns of it from HTTP/2 keep-alive pings, and
`LeaseKeeper.close` does not wait on an ExtendLease nobody answers. Every wait on the frozen
buffer runs in a daemon thread joined with a bound, so a regression fails instead of hanging."""

import concurrent.futures
import os
import signal
import threading
import time

import grpc
import pytest
from sample_factory import make_samples

from clawjax.buffer import BufferClient, BufferServer, BufferUnavailableError, LeaseKeeper
from clawjax.buffer import rollout_pb2 as pb
from clawjax.buffer import client as client_mod
from clawjax.buffer.testing import ServerProcess
from clawjax.sources import BufferSource

BOUND_S = 10.0   # the old behaviour was 60 s (rpc_timeout_s) per attempt, or for ever


def _within(fn, seconds: float = BOUND_S):
    """Runs `fn` in a daemon thread for at most `seconds`: ("done", value), ("raised", error)
    or ("blocked", None)."""
    box = {}

    def run():
        try:
            box["done"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["raised"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return "blocked", None
    return next(iter(box.items()))


@pytest.fixture
def frozen(tmp_path):
    """A buffer subprocess holding 8 samples, and `freeze()` to SIGSTOP it; resumed and
    killed at the end."""
    proc = ServerProcess(str(tmp_path / "buf"), "--lease-timeout-s", "30")
    proc.start()
    with BufferClient(proc.address) as c:
        c.push(make_samples(8))
    proc.freeze = lambda: os.kill(proc.proc.pid, signal.SIGSTOP)
    try:
        yield proc
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)
        proc.kill()
        proc.stop()


def test_attempt_timeout_is_the_budget_left_bounded_by_the_rpc_timeout_plus_the_wait():
    attempt_timeout_s, MIN_ATTEMPT_S = client_mod.attempt_timeout_s, client_mod.MIN_ATTEMPT_S
    assert MIN_ATTEMPT_S == 5.0
    assert attempt_timeout_s(60.0, 12.0) == 12.0
    assert attempt_timeout_s(60.0, 120.0) == 60.0                 # a large budget: as before
    assert attempt_timeout_s(60.0, 1.0) == MIN_ATTEMPT_S          # every attempt gets a floor
    assert attempt_timeout_s(60.0, -3.0) == MIN_ATTEMPT_S
    assert attempt_timeout_s(0.2, 10.0) == 0.2                    # a short rpc_timeout_s holds
    assert attempt_timeout_s(60.0, 12.0, wait_s=2.5) == 14.5      # a Lease's long-poll on top


def test_unary_calls_to_a_frozen_buffer_give_up_within_the_retry_budget(frozen):
    with BufferClient(frozen.address, retry_budget_s=1.0) as client:
        held = client.lease(4, timeout_s=1.0)
        assert len(held) == 4
        frozen.freeze()
        calls = {"stats": client.stats,
                 "lease": lambda: client.lease(4, timeout_s=1.0),
                 "ack": lambda: client.ack([s.sample_id for s in held]),
                 "extend_lease": lambda: client.extend_lease(["x"])}
        with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:   # at once: 5 s each
            outcomes = dict(zip(calls, pool.map(_within, calls.values())))
        for name, (outcome, value) in outcomes.items():
            assert outcome == "raised", f"{name}: {outcome} after {BOUND_S} s"
            assert isinstance(value, BufferUnavailableError), f"{name}: {value!r}"
            assert value.code == "DEADLINE_EXCEEDED"


def test_a_buffer_source_on_a_frozen_buffer_returns_from_take_and_close(frozen):
    """As the trainer builds it (`retry_budget_s` = `trainer.take_timeout_s`): a take with
    acknowledgements pending and the close (its keeper mid ExtendLease) both come back."""
    source = BufferSource(frozen.address, retry_budget_s=1.0, keepalive_s=0.2)
    try:
        got = source.take(4, timeout_s=1.0)
        assert len(got) == 4
        frozen.freeze()
        source.ack_pending.update(s.sample_id for s in got)
        time.sleep(0.5)                                   # the keeper is in an ExtendLease
        leases = []
        lease = source.client.lease
        source.client.lease = lambda *a, **kw: leases.append(a) or lease(*a, **kw)
        outcome, value = _within(lambda: source.take(4, timeout_s=1.0))
        assert (outcome, value) == ("done", [])
        assert source.ack_pending == {s.sample_id for s in got}   # still pending, not lost
        assert leases == []   # the acks found the buffer down: no second retry budget spent
    finally:
        outcome, _ = _within(source.close)
        assert outcome == "done"


def test_lease_keeper_close_does_not_wait_for_an_unanswered_extend(frozen):
    """With a long retry budget the keeper's ExtendLease on a frozen buffer lasts long;
    `close` returns anyway (False: the thread still runs), and closing the client cancels
    the call, after which the thread ends."""
    client = BufferClient(frozen.address, retry_budget_s=120.0)
    keeper = LeaseKeeper(client, interval_s=0.1)
    keeper.add(s.sample_id for s in client.lease(2, timeout_s=1.0))
    frozen.freeze()
    time.sleep(0.5)                                       # the keeper is in an ExtendLease
    outcome, stopped = _within(keeper.close)
    assert (outcome, stopped) == ("done", False)
    client.close()
    outcome, stopped = _within(lambda: keeper.close(timeout_s=5.0))
    assert (outcome, stopped) == ("done", True)


def test_a_stream_on_a_frozen_buffer_fails_through_its_keepalive_pings(frozen):
    """A Stream has no deadline: an unanswered keep-alive ping ends its connection, and the
    reconnects fail within the retry budget."""
    client = BufferClient(frozen.address, retry_budget_s=1.0, ping_interval_s=1.0,
                          ping_timeout_s=1.0)
    try:
        stream = client.stream(max_in_flight=8)
        first = [next(stream) for _ in range(8)]
        client.ack([s.sample_id for s in first])          # nothing left: the stream waits
        frozen.freeze()
        outcome, value = _within(lambda: next(stream))
        assert outcome == "raised", f"next(stream) {outcome} after {BOUND_S} s"
        assert isinstance(value, BufferUnavailableError), repr(value)
    finally:
        client.close()


def test_a_quiet_stream_pinged_every_second_is_not_sent_away(tmp_path):
    """The server accepts the pings of a client at its shortest `ping_interval_s` on a
    Stream that receives nothing for several seconds (no GOAWAY too_many_pings)."""
    with BufferServer(tmp_path, fsync=False) as server, \
            BufferClient(server.address, ping_interval_s=1.0) as client, \
            BufferClient(server.address) as pusher:
        call = client._stream_raw(pb.StreamRequest(max_in_flight=4),
                                  metadata=client._as_consumer)
        box = {}

        def first_batch():
            try:
                box["batch"] = next(call)
            except grpc.RpcError as e:
                box["error"] = f"{e.code().name}: {e.details()}"

        reader = threading.Thread(target=first_batch, daemon=True)
        reader.start()
        try:
            reader.join(6.0)                               # about 6 pings, no data
            assert reader.is_alive(), f"the quiet stream ended: {box}"
            pusher.push(make_samples(1))
            reader.join(BOUND_S)
            assert "batch" in box, box
        finally:
            call.cancel()


def next_in_a_thread(stream):
    """Starts a thread waiting for the stream's next sample; returns (thread, box): the box
    gets "sample" or the "error" that ended the wait."""
    box = {}

    def wait_for_next():
        try:
            box["sample"] = next(stream)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    waiting = threading.Thread(target=wait_for_next, daemon=True)
    waiting.start()
    return waiting, box


def test_a_quiet_stream_reconnects_after_a_restart_past_its_retry_budget(tmp_path):
    """The stream's retry budget counts from its first failure, not from its last batch: a
    buffer restart after a quiet spell longer than the budget is retried."""
    server = BufferServer(tmp_path, fsync=False)
    port = server.start()
    client = BufferClient(f"127.0.0.1:{port}", retry_budget_s=3.0)
    try:
        client.push(make_samples(1, prefix="a"))
        stream = client.stream(max_in_flight=4)
        client.ack([next(stream).sample_id])
        waiting, box = next_in_a_thread(stream)
        time.sleep(3.5)                                    # quiet for longer than the budget
        server.stop()
        time.sleep(0.5)                                    # its reconnects fail meanwhile
        server = BufferServer(tmp_path, port=port, fsync=False)
        server.start()
        client.push(make_samples(1, prefix="b"))
        waiting.join(BOUND_S)
        assert not waiting.is_alive() and "sample" in box, box
        assert box["sample"].sample_id.startswith("b")
    finally:
        client.close()
        server.stop()


def test_a_stream_open_through_its_pings_gets_a_whole_budget_for_its_next_failure(tmp_path):
    """A failure, a reconnect that stays open (quiet, answering keep-alive pings) past the
    first failure's budget, then a second failure: retried with a whole budget again. It was
    raised at once (the budget ran from the first failure until a batch came)."""
    server = BufferServer(tmp_path, fsync=False)
    port = server.start()
    client = BufferClient(f"127.0.0.1:{port}", retry_budget_s=2.0, ping_interval_s=1.0,
                          ping_timeout_s=0.5)   # alive once a call is open 2.5 s
    try:
        waiting, box = next_in_a_thread(client.stream(max_in_flight=4))
        time.sleep(0.5)
        for _ in range(2):                                 # two restarts 4 s apart
            server.stop()
            time.sleep(0.3)
            server = BufferServer(tmp_path, port=port, fsync=False)
            server.start()
            time.sleep(3.5)                                # reconnected, open and quiet
            assert waiting.is_alive(), box
        client.push(make_samples(1, prefix="b"))
        waiting.join(BOUND_S)
        assert not waiting.is_alive() and "sample" in box, box
    finally:
        client.close()
        server.stop()


@pytest.mark.parametrize("kw, name", [({"ping_interval_s": 0.1}, "ping_interval_s"),
                                      ({"ping_timeout_s": float("nan")}, "ping_timeout_s"),
                                      ({"ping_interval_s": True}, "ping_interval_s")])
def test_ping_settings_out_of_range_are_refused_by_name(kw, name):
    with pytest.raises(ValueError, match=rf"^{name} = .*expected finite seconds ≥"):
        BufferClient("127.0.0.1:1", **kw)


def test_keepalive_options_hold_the_ping_settings_and_the_server_permits_them():
    """The option values (the frozen-stream test above shows the client's channel uses them);
    the server permits pings more often than any client may send them."""
    from clawjax.buffer import keepalive

    options = dict(keepalive.client_options(2.0, 0.5))
    assert options["grpc.keepalive_time_ms"] == 2000
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 500
    assert dict(keepalive.server_options())["grpc.http2.min_ping_interval_without_data_ms"] \
        < keepalive.MIN_PING_INTERVAL_S * 1000
