"""The real buffer server in a subprocess on loopback: round trip, leases, nack, ack, stream flow
control, backpressure, staleness, torn write, compaction."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from clawjax.buffer import (BufferClient, BufferFullError, InvalidSampleError, LeaseKeeper,
                            MessageTooLargeError, codec)
from clawjax.buffer import rollout_pb2 as pb
from clawjax.buffer.testing import ServerProcess
from clawjax.buffer.wal import read_stale
from clawjax.sample import Sample


def make(sid: str, n_tokens: int = 16, version: int = 0, payload: int = 0) -> Sample:
    r = n_tokens // 2
    return Sample(sid, np.arange(n_tokens) % 1000, r, rollout_logp=np.full(r, -0.5),
                  policy_version=version, metadata={"pad": "p" * payload} if payload else {})


def full_sample(sid: str) -> Sample:
    rng = np.random.default_rng(1)
    r, k = 6, 4
    return Sample(
        sample_id=sid, tokens=rng.integers(0, 150_000, size=20), response_len=r,
        loss_mask=np.array([1, 1, 0, 1, 0, 1]), rollout_logp=-rng.random(r),
        reward=-0.75, kind="both", session_id="session/42", turn_index=3,
        policy_version=17, created_unix_ms=1_764_000_000_999,
        step_rewards=np.array([0.0, 1.0, -1.0]), teacher_logp=-rng.random(r) * 3,
        teacher_topk_logp=-rng.random((r, k)) * 5,
        teacher_topk_ids=rng.integers(0, 150_000, size=(r, k)),
        metadata={"env": "swe", "judge": "prm-v2 ✓", "hint": "use the flag\nnext time"})


@pytest.fixture
def server(tmp_path):
    with ServerProcess(str(tmp_path / "buf"), "--lease-timeout-s", "30") as proc:
        yield proc


@pytest.fixture
def client(server):
    with BufferClient(server.address, retry_budget_s=30) as c:
        yield c


def test_round_trip_every_field(client):
    sent = [full_sample("full"), make("plain")]
    assert client.push(sent) == (2, 0)
    got = {s.sample_id: s for s in client.lease(10, timeout_s=5)}
    assert set(got) == {"full", "plain"}
    for s in sent:
        assert got[s.sample_id].equals(s), s.sample_id
    assert got["plain"].teacher_logp is None and got["plain"].teacher_topk_ids is None
    assert got["full"].teacher_topk_logp.shape == (6, 4)


def test_push_is_idempotent_and_counts_duplicates(client, server):
    assert client.push([make("a"), make("b")]) == (2, 0)
    assert client.push([make("b"), make("c"), make("c")]) == (1, 2)
    client.ack([s.sample_id for s in client.lease(10, timeout_s=5)])
    server.restart()
    assert client.push([make("a"), make("d")]) == (1, 1)   # acked "a" is still known
    stats = client.stats()
    assert stats["duplicates_total"] == 1 and stats["queued"] == 1


def test_nack_redelivers_and_ack_is_final_across_restart(client, server):
    client.push([make("x"), make("y")])
    first = client.lease(1, timeout_s=5)[0]
    assert first.sample_id == "x"
    assert client.lease(5, timeout_s=0.2)[0].sample_id == "y"   # x is invisible while leased
    assert client.nack(["x"]) == 1
    assert [s.sample_id for s in client.lease(5, timeout_s=5)] == ["x"]
    assert client.ack(["x", "y"]) == 2
    assert client.lease(5, timeout_s=0.3) == []
    server.restart()
    assert client.lease(5, timeout_s=0.3) == []
    stats = client.stats()
    assert stats["queued"] == 0 and stats["leased"] == 0


def test_leases_do_not_survive_a_restart(client, server):
    client.push([make("l1"), make("l2")])
    assert len(client.lease(5, timeout_s=5)) == 2
    server.kill()
    server.start()
    assert sorted(s.sample_id for s in client.lease(5, timeout_s=5)) == ["l1", "l2"]


def test_lease_expiry_redelivers_and_extend_keeps_it(tmp_path):
    with ServerProcess(str(tmp_path), "--lease-timeout-s", "1.5") as proc, \
            BufferClient(proc.address) as c:
        c.push([make("e1"), make("e2")])
        got = c.lease(2, timeout_s=5)
        assert c.extend_lease(["e2", "nope"], lease_timeout_s=60) == (["e2"], ["nope"])
        # e1's lease expires; the waiting lease gets it back (e2's extended lease holds)
        again = c.lease(5, timeout_s=10)
        assert [s.sample_id for s in again] == ["e1"] and len(got) == 2
        assert c.stats()["expired_total"] >= 1
        assert c.ack(["e1"]) == 1
        assert c.lease(5, timeout_s=1.0) == []            # e2 is held for 60 s, e1 is done
        assert c.stats()["leased"] == 1


def test_lease_keeper_keeps_leases_alive_until_released(tmp_path):
    with ServerProcess(str(tmp_path), "--lease-timeout-s", "2") as proc, \
            BufferClient(proc.address) as c:
        c.push([make("k1"), make("k2")])
        held = [s.sample_id for s in c.lease(2, timeout_s=5)]
        keeper = LeaseKeeper(c, interval_s=0.05, lease_timeout_s=60)
        keeper.add(held)
        try:
            # without the keeper both leases would expire after 2 s and come back here
            assert c.lease(5, timeout_s=3) == []
            assert keeper.lost_total == 0
            keeper.remove(["k2"])
            assert c.ack(["k1"]) == 1
        finally:
            keeper.close()
        assert c.stats()["leased"] == 1
        c.nack(["k2"])
        assert [s.sample_id for s in c.lease(5, timeout_s=5)] == ["k2"]


def test_lease_keeper_does_not_call_an_id_acked_during_its_extend_lost(tmp_path):
    """An id acked (and removed from the keeper) while an ExtendLease naming it is in flight
    comes back "lost" from the server; it was finished by us, not redelivered, so the keeper
    does not report it."""
    with ServerProcess(str(tmp_path), "--lease-timeout-s", "30") as proc, \
            BufferClient(proc.address) as c:
        c.push([make("a1"), make("a2")])
        held = [s.sample_id for s in c.lease(2, timeout_s=5)]
        extending, acked = threading.Event(), threading.Event()
        real_extend = c.extend_lease

        def extend_after_the_ack(ids, length):
            extending.set()
            acked.wait(10)
            return real_extend(ids, length)

        c.extend_lease = extend_after_the_ack
        keeper = LeaseKeeper(c, interval_s=0.01, lease_timeout_s=60)
        keeper.add(held)
        try:
            assert extending.wait(10)
            keeper.remove(["a1"])
            assert c.ack(["a1"]) == 1
            acked.set()
            c.extend_lease = real_extend
            time.sleep(0.1)  # the in-flight extend returns; later ones name only a2
        finally:
            keeper.close()
        assert keeper.lost_total == 0
        c.nack(["a2"])   # a2 really is lost to the keeper once another consumer holds it
        keeper = LeaseKeeper(c, interval_s=0.01, lease_timeout_s=60)
        keeper.add(["a2"])
        try:
            deadline = time.monotonic() + 10
            while not keeper.lost_total and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            keeper.close()
        assert keeper.lost_total == 1


def test_lease_keeper_counts_ids_lost_to_restarts_and_keeps_none_of_them(tmp_path):
    """A restart forgets leases: the keeper's next ExtendLease reports every id it holds
    lost. They are counted and dropped; the keeper keeps no record of them, so over a long
    run of restarts its memory is the ids it holds now."""
    with ServerProcess(str(tmp_path), "--lease-timeout-s", "30") as proc, \
            BufferClient(proc.address, retry_budget_s=30) as c:
        keeper = LeaseKeeper(c, interval_s=0.05, lease_timeout_s=60)
        try:
            for round_ in range(2):
                c.push([make(f"r{round_}-{i}") for i in range(3)])
                keeper.add(s.sample_id for s in c.lease(3, timeout_s=5))
                proc.restart()
                deadline = time.monotonic() + 10
                while keeper.lost_total < 3 * (round_ + 1) and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert keeper.lost_total == 3 * (round_ + 1)
                c.ack([f"r{round_}-{i}" for i in range(3)])   # trained anyway: finished
        finally:
            keeper.close()
        assert not hasattr(keeper, "lost")   # no set of ids grows with the restarts
        assert keeper._ids == set()


def test_stream_flow_control(client):
    client.push([make(f"s{i}") for i in range(10)])
    stream = client.stream(max_in_flight=3)
    first = [next(stream) for _ in range(3)]
    assert [s.sample_id for s in first] == ["s0", "s1", "s2"]
    stats = client.stats()
    assert (stats["leased"], stats["queued"]) == (3, 7)   # nothing more until we ack
    client.ack(["s0", "s1"])
    nxt = [next(stream) for _ in range(2)]
    assert [s.sample_id for s in nxt] == ["s3", "s4"]
    client.nack(["s2"])
    assert next(stream).sample_id == "s2"
    stream.close()


def test_backpressure_refuses_retries_and_loses_nothing(tmp_path):
    one = len(codec.to_proto(make("bp-0", payload=900)).SerializeToString())
    with ServerProcess(str(tmp_path), "--max-bytes", str(10 * one)) as proc:
        with BufferClient(proc.address) as c:
            assert c.push([make(f"bp-{i}", payload=900) for i in range(10)]).accepted == 10
        impatient = BufferClient(proc.address, retry_budget_s=0.5)
        with pytest.raises(BufferFullError) as info:
            impatient.push([make("bp-10", payload=900)])
        assert info.value.code == "RESOURCE_EXHAUSTED" and "max_bytes" in str(info.value)
        impatient.close()

        pusher, consumer = BufferClient(proc.address), BufferClient(proc.address)
        done = threading.Event()

        def push_rest():
            for i in range(10, 40, 5):
                pusher.push([make(f"bp-{j}", payload=900) for j in range(i, i + 5)])
            done.set()

        thread = threading.Thread(target=push_rest)
        thread.start()
        seen = []
        while len(set(seen)) < 40:
            got = consumer.lease(3, timeout_s=10)
            assert got, "consumer starved"
            seen += [s.sample_id for s in got]
            consumer.ack([s.sample_id for s in got])
        thread.join()
        assert done.is_set() and sorted(set(seen)) == sorted(f"bp-{i}" for i in range(40))
        assert len(seen) == 40
        stats = consumer.stats()
        assert stats["backpressure_total"] >= 1 and stats["bytes"] == 0
        pusher.close()
        consumer.close()


def test_staleness_withholds_counts_and_keeps_on_disk(tmp_path):
    with ServerProcess(str(tmp_path), "--max-staleness", "2") as proc, \
            BufferClient(proc.address) as c:
        c.push([make(f"v{v}", version=v) for v in range(6)])
        assert c.set_policy_version(5) == 3          # versions 0, 1, 2 are > 2 behind
        assert sorted(s.sample_id for s in c.lease(10, timeout_s=5)) == ["v3", "v4", "v5"]
        c.push([make("late", version=1)])           # stale on arrival
        assert c.lease(10, timeout_s=0.3) == []
        stats = c.stats()
        assert stats["stale_total"] == 4 and stats["policy_version"] == 5
        assert stats["queued"] == 0
        c.nack(["v3"])
        c.set_policy_version(6)                       # v3 is now 3 behind
        assert c.lease(10, timeout_s=0.3) == []
        proc.restart()                                # announced version is durable
        assert c.stats()["policy_version"] == 6
    stale = read_stale(tmp_path)
    assert sorted(sid for sid, _, _ in stale) == ["late", "v0", "v1", "v2", "v3"]
    sid, version, data = stale[0]
    assert codec.from_proto(pb.Sample.FromString(data)).policy_version == version


def test_torn_write_after_kill_recovers_everything_before(tmp_path):
    with ServerProcess(str(tmp_path)) as proc:
        with BufferClient(proc.address) as c:
            for i in range(20):
                c.push([make(f"t{i}")])
        proc.kill()
        seg = max((tmp_path / "wal").glob("wal-*.log"))
        os.truncate(seg, seg.stat().st_size - 7)      # tear the last record
        proc.start()
        with BufferClient(proc.address) as c:
            got = sorted(int(s.sample_id[1:]) for s in c.lease(100, timeout_s=5))
            assert got == list(range(19))
            assert c.push([make("t19")]) == (1, 0)     # the torn one was never there


def test_a_burst_of_sigterms_stops_the_server_cleanly(tmp_path):
    """A signal can land while the previous one's handler runs (a Ctrl-C pressed twice, a
    supervisor and a parent-death signal together): the server still stops, exits 0 and
    releases its directory with everything pushed kept."""
    proc = ServerProcess(str(tmp_path))
    proc.start()
    try:
        with BufferClient(proc.address) as c:
            c.push([make("s0")])
        for _ in range(300):
            proc.proc.send_signal(signal.SIGTERM)
        try:
            assert proc.proc.wait(30) == 0, proc.log_tail()
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server hung after a burst of SIGTERMs: {proc.log_tail()}")
        assert "stopped" in proc.log_tail()
        proc.start()     # the same directory: its lock was released
        with BufferClient(proc.address) as c:
            assert [s.sample_id for s in c.lease(10, timeout_s=5)] == ["s0"]
    finally:
        proc.kill()


def test_acked_samples_are_compacted_out_of_the_log(tmp_path):
    args = ["--segment-bytes", str(32 << 10)]
    with ServerProcess(str(tmp_path), *args) as proc, BufferClient(proc.address) as c:
        for b in range(30):
            c.push([make(f"c{b}-{i}", payload=1000) for i in range(10)])
            c.ack([s.sample_id for s in c.lease(10, timeout_s=5)])
        for _ in range(200):   # the compactor runs every second in the background
            stats = c.stats()
            if stats["compactions_total"] >= 1 and stats["wal_bytes"] < 100_000:
                break
            time.sleep(0.1)
        assert stats["compactions_total"] >= 1 and stats["wal_bytes"] < 100_000, stats
        proc.restart()
        assert c.lease(10, timeout_s=0.2) == []
        assert c.push([make("c0-0")]) == (0, 1)


def test_message_and_sample_size_limits_are_enforced(tmp_path):
    with ServerProcess(str(tmp_path), "--max-message-bytes", "200000",
                       "--max-sample-bytes", "50000") as proc, \
            BufferClient(proc.address, retry_budget_s=30) as c:
        with pytest.raises(MessageTooLargeError):       # over the gRPC message limit
            c.push([make(f"m{i}", payload=40_000) for i in range(6)])
        with pytest.raises(InvalidSampleError, match="max_sample_bytes"):
            c.push([make("big", payload=60_000)])        # one sample over the sample limit
        assert c.push([make("fits", payload=40_000)]) == (1, 0)
        assert [s.sample_id for s in c.lease(10, timeout_s=5)] == ["fits"]


def test_a_missing_token_file_is_an_error_line_not_a_traceback(tmp_path):
    missing = tmp_path / "missing.token"
    out = subprocess.run([sys.executable, "-m", "clawjax.buffer", "serve", "--port", "0",
                          "--dir", str(tmp_path / "buf"), "--token-file", str(missing)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == \
        f"error: --token-file {missing}: No such file or directory"
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "buf").exists()
