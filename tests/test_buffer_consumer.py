"""Consumer tokens: a Nack or ExtendLease from a consumer whose lease expired never touches the
lease another consumer now holds (each `BufferClient` names itself in `x-clawjax-consumer`
metadata); a late Ack is honoured (the sample was trained); requests without the header keep
the behaviour from before tokens. Real server on loopback, in process."""

import re

import grpc
import numpy as np
import pytest

from clawjax.buffer import BufferClient, BufferServer
from clawjax.buffer import rollout_pb2 as pb
from clawjax.buffer import rollout_pb2_grpc as pb_grpc
from clawjax.buffer.consumer import HEADER
from clawjax.buffer.store import Store
from clawjax.sample import Sample


def _sample(sid: str) -> Sample:
    return Sample(sid, np.arange(12) % 97, 4, rollout_logp=np.full(4, -0.5))


@pytest.fixture
def server(tmp_path):
    with BufferServer(tmp_path / "buf", lease_timeout_s=60) as server:
        yield server


def _client(server, **kw) -> BufferClient:
    return BufferClient(server.address, retry_budget_s=5, rpc_timeout_s=30, **kw)


def _expire_and_relet(first: BufferClient, second: BufferClient, sid: str) -> None:
    """`first` leases `sid` and lets its lease run out (shortened to 0.2 s); `second` then
    leases it (a long-poll Lease wakes at the expiry) under the server's 60 s lease."""
    assert [s.sample_id for s in first.lease(1)] == [sid]
    assert first.extend_lease([sid], lease_timeout_s=0.2) == ([sid], [])
    assert [s.sample_id for s in second.lease(1, timeout_s=30)] == [sid]


def test_a_late_nack_does_not_requeue_a_sample_another_consumer_holds(server):
    with _client(server) as first, _client(server) as second, _client(server) as third:
        first.push([_sample("x")])
        _expire_and_relet(first, second, "x")
        assert first.nack(["x"]) == 0                      # not first's to give back
        assert first.extend_lease(["x"], 60) == ([], ["x"])
        assert third.lease(1) == []                         # not queued again
        assert second.extend_lease(["x"], 60) == (["x"], [])
        assert second.ack(["x"]) == 1
        assert third.lease(1) == [] and first.lease(1) == []   # never delivered a third time
        stats = second.stats()
        assert (stats["queued"], stats["leased"], stats["acked_total"]) == (0, 0, 1)
        assert stats["nacked_total"] == 0 and stats["expired_total"] == 1


def test_stream_leases_carry_the_token_and_so_does_the_give_back_nack(server):
    """A streamed sample is nackable by its client only; the nack a stream sends for samples
    received but never handed out (`_give_back`) is a late nack once their leases expired."""
    with _client(server) as first, _client(server) as second:
        first.push([_sample("s1")])
        stream = first.stream(max_in_flight=1)
        assert next(stream).sample_id == "s1"
        assert second.nack(["s1"]) == 0 and first.extend_lease(["s1"], 60) == (["s1"], [])
        stream.close()
        first.push([_sample("g1")])
        _expire_and_relet(first, second, "g1")
        first._give_back(["g1"])
        assert second.stats()["leased"] == 2 and second.ack(["g1"]) == 1


def test_a_late_ack_is_honoured_and_the_new_holder_finds_the_sample_finished(server):
    with _client(server) as first, _client(server) as second:
        first.push([_sample("y")])
        _expire_and_relet(first, second, "y")
        assert first.ack(["y"]) == 1                        # trained by first: finished for good
        assert second.extend_lease(["y"], 60) == ([], ["y"])
        assert second.ack(["y"]) == 0 and second.nack(["y"]) == 0
        assert first.lease(1) == [] and second.stats()["acked_total"] == 1


def test_clients_sharing_a_consumer_token_act_as_one_consumer(server):
    with _client(server, consumer="trainer-7") as leaser, \
            _client(server, consumer="trainer-7") as helper, _client(server) as other:
        leaser.push([_sample("z")])
        assert [s.sample_id for s in leaser.lease(1)] == ["z"]
        assert other.nack(["z"]) == 0 and helper.nack(["z"]) == 1
    a, b = _client(server), _client(server)
    assert re.fullmatch(r"[0-9a-f]{32}", a.consumer) and a.consumer != b.consumer
    a.close(), b.close()
    for bad in ("", "x" * 129, "tab\there", "ü"):
        with pytest.raises(ValueError, match=r"consumer = .*expected 1 to 128 printable"):
            BufferClient("127.0.0.1:1", consumer=bad)


def test_requests_without_the_header_keep_the_behaviour_from_before_tokens(server):
    """A lease taken without a token is anyone's to nack or extend (clients in other languages);
    a lease taken with one cannot be moved by a request without it."""
    channel = grpc.insecure_channel(server.address)
    raw, raw_other = pb_grpc.RolloutBufferStub(channel), pb_grpc.RolloutBufferStub(channel)
    try:
        with _client(server) as tokened:
            tokened.push([_sample("a"), _sample("b")])
            leased = raw.Lease(pb.LeaseRequest(max_samples=1), timeout=30)
            assert [s.sample_id for s in leased.samples] == ["a"]
            assert raw_other.Nack(pb.SampleIds(sample_ids=["a"]), timeout=30).requeued == 1
            assert [s.sample_id for s in tokened.lease(1)] == ["a"]
            reply = raw.ExtendLease(pb.ExtendLeaseRequest(sample_ids=["a"]), timeout=30)
            assert list(reply.lost) == ["a"]
            reply = raw.Nack(pb.SampleIds(sample_ids=["a"]), timeout=30,
                             metadata=((HEADER, ""),))      # an empty token is no token
            assert (reply.requeued, reply.unknown) == (0, 1)
            assert tokened.nack(["a"]) == 1
    finally:
        channel.close()


def test_store_nack_and_extend_only_move_the_holders_lease(tmp_path):
    store = Store(tmp_path, compact_interval_s=3600)
    try:
        store.push([("q", 0, b"q")])
        assert [sid for sid, _ in store.lease(1, holder="A")] == ["q"]
        assert store.nack(["q"], holder="B") == (0, 1) and store.nack(["q"]) == (0, 1)
        assert store.extend(["q"], 5.0, holder="B") == ([], ["q"])
        assert store.extend(["q"], 5.0, holder="A") == (["q"], [])
        assert store.nack(["q"], holder="A") == (1, 0)
        assert store.stats()["unknown_acks_total"] == 2
    finally:
        store.close()


def test_a_lease_whose_caller_left_stops_waiting_and_leases_nothing_to_it(tmp_path):
    """A Lease cancelled while it waits (the caller gave up or died) frees its wait slot at
    once and never takes a sample pushed after it left: the sample goes to a live consumer
    now, not after a lease expiry (before: the dead call waited its whole timeout holding a
    slot, then leased the next sample to nobody)."""
    import time

    with BufferServer(tmp_path, lease_timeout_s=30, max_workers=2, fsync=False) as server, \
            BufferClient(server.address, retry_budget_s=10) as client:
        channel = grpc.insecure_channel(server.address)
        waiting = pb_grpc.RolloutBufferStub(channel).Lease.future(
            pb.LeaseRequest(max_samples=1, timeout_s=60))
        time.sleep(0.5)
        waiting.cancel()
        time.sleep(0.5)   # the server notices within its wait slice
        client.push([Sample("after", np.arange(4), 2, rollout_logp=[-0.5, -0.5])])
        got = client.lease(1, timeout_s=2)   # 1 wait slot of max_workers = 2: free again
        assert [s.sample_id for s in got] == ["after"]
        assert client.stats()["expired_total"] == 0
        channel.close()
