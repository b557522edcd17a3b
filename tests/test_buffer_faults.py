"""The buffer under faults: a failed disk write never loses what was acknowledged, never leaves a
sample stuck, never lets a later write land behind torn bytes; a closed store wakes its
waiters; a failed bind releases the directory; concurrent calls that race a failure report it.
Faults are injected at the OS-call seams (`os.open`, the write helper, `wal.append`)."""

import errno
import os
import pathlib
import socket
import threading
import time

import numpy as np
import pytest

from clawjax.buffer import BufferClient
from clawjax.buffer import append_log as append_log_mod
from clawjax.buffer import wal as wal_mod
from clawjax.buffer import wire
from clawjax.buffer.compaction import DoneLog
from clawjax.buffer.server import BufferServer
from clawjax.buffer.store import Store
from clawjax.buffer.wal import RecordType, WalClosedError, WriteAheadLog, read_stale
from clawjax.sample import Sample, SampleError


def _store(path, **kw) -> Store:
    return Store(path, compact_interval_s=3600, **kw)


def _fail_next_write(monkeypatch, written_fraction: float = 0.5):
    """The next `write_all` of an append-only log (done.log, stale.log) of more than a header
    writes part of its bytes, then fails with ENOSPC (what a full disk does); later ones work."""
    real = append_log_mod.write_all
    state = {"armed": True}

    def write(fd, data):
        if state["armed"] and len(data) > len(wal_mod.MAGIC):
            state["armed"] = False
            real(fd, bytes(data)[:int(len(data) * written_fraction)])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(append_log_mod, "write_all", write)
    return state


def test_a_failed_done_log_append_is_cut_back_so_later_records_survive_a_restart(
        tmp_path, monkeypatch):
    log = DoneLog(tmp_path)
    log.append(["a1", "a2"])
    size = (tmp_path / "done.log").stat().st_size
    _fail_next_write(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        log.append(["b1", "b2", "b3"])
    assert (tmp_path / "done.log").stat().st_size == size
    log.append(["c1"])
    assert DoneLog(tmp_path).ids() == ["a1", "a2", "c1"]


def test_a_done_log_whose_failed_append_cannot_be_cut_back_refuses_later_appends(
        tmp_path, monkeypatch):
    log = DoneLog(tmp_path)
    _fail_next_write(monkeypatch)
    monkeypatch.setattr(wal_mod.os, "ftruncate",
                        lambda fd, n: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="No space left"):
        log.append(["b1"])
    monkeypatch.undo()
    with pytest.raises(OSError, match=r"done.log: appends refused: an append failed .* cutting "
                                      r"the file back to 8 bytes failed too"):
        log.append(["c1"])


def test_an_acked_id_stays_finished_after_a_compaction_whose_done_log_write_failed(
        tmp_path, monkeypatch):
    """The compaction that fails leaves the WAL as it was; the next one moves the ids to
    done.log and drops the segments; after a restart the acked id is still a duplicate."""
    store = _store(tmp_path, segment_bytes=64)
    store.push([("A", 0, b"a" * 40)])
    assert [sid for sid, _ in store.lease(1)] == ["A"]
    store.ack(["A"])
    store.push([("filler", 0, b"f" * 40)])
    _fail_next_write(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        store.maybe_compact(force=True)
    store.push([("filler2", 0, b"g" * 40)])
    assert store.maybe_compact(force=True) > 0
    store.close()
    store = _store(tmp_path)
    try:
        assert store.push([("A", 0, b"again")]) == (0, 1)
        assert sorted(sid for sid, _ in store.lease(10)) == ["filler", "filler2"]
    finally:
        store.close()


def test_a_failed_stale_log_write_queues_the_samples_again_and_nothing_hangs(
        tmp_path, monkeypatch):
    store = _store(tmp_path, max_staleness=0)
    try:
        store.push([("old", 0, b"o"), ("new", 5, b"n")])
        real = store.stale_log.append
        store.stale_log.append = lambda items: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device"))
        with pytest.raises(OSError, match="No space left"):
            store.set_policy_version(5)
        assert store.stats()["queued"] == 2 and store.stats()["stale_total"] == 0
        # A lease meets the stale sample first: the failure is logged, the fresh one still goes.
        assert [sid for sid, _ in store.lease(5)] == ["new"]
        assert store.stats()["queued"] == 1
        store.stale_log.append = real
        acked = {}
        ack = threading.Thread(target=lambda: acked.setdefault("old", store.ack(["old"])),
                               daemon=True)
        ack.start()
        ack.join(10)
        assert acked == {"old": (1, 0)}
        assert store.stats()["bytes"] == 1   # "new" (leased) only
    finally:
        store.close()
    assert read_stale(tmp_path) == []


def test_an_ack_that_waited_on_a_concurrent_finish_that_failed_raises(tmp_path):
    store = _store(tmp_path)
    try:
        store.push([("x", 0, b"x")])
        store.lease(1)
        entered, release = threading.Event(), threading.Event()
        real = store.wal.append

        def failing_append(records):
            entered.set()
            release.wait(10)
            raise OSError(errno.EIO, "I/O error")

        store.wal.append = failing_append
        results = {}

        def call(name):
            try:
                results[name] = store.ack(["x"])
            except Exception as e:  # noqa: BLE001 - recorded for the assertions
                results[name] = e

        first = threading.Thread(target=call, args=("first",), daemon=True)
        first.start()
        assert entered.wait(10)
        retry = threading.Thread(target=call, args=("retry",), daemon=True)
        retry.start()
        deadline = time.monotonic() + 10
        while store.counters["unknown_acks_total"] < 1 and time.monotonic() < deadline:
            time.sleep(0.001)   # until the retry finds "x" being finished and waits on it
        release.set()
        first.join(10)
        retry.join(10)
        store.wal.append = real
        assert isinstance(results["first"], OSError)
        assert isinstance(results["retry"], RuntimeError)
        assert "a concurrent finish of the same id failed" in str(results["retry"])
        assert [sid for sid, _ in store.lease(1)] == ["x"]
    finally:
        store.close()


def test_closing_the_store_wakes_a_long_poll_lease_and_a_slot_wait(tmp_path):
    store = _store(tmp_path)
    results = {}
    lease = threading.Thread(target=lambda: results.setdefault("lease", store.lease(1, 300.0)),
                             daemon=True)
    slot = threading.Thread(
        target=lambda: results.setdefault("slot", store.wait_for_slot("me", 0, 300.0)),
        daemon=True)
    lease.start()
    slot.start()
    store.close()
    lease.join(20)
    slot.join(20)
    assert not lease.is_alive() and not slot.is_alive()
    assert results == {"lease": [], "slot": False}


def test_a_push_keeps_its_own_copy_of_each_sample_not_a_view_of_the_request(tmp_path):
    """A view into the request would keep the whole request (its duplicates, its acked
    siblings) alive as long as one of its samples is held, outside `max_bytes`."""
    request = bytearray(b"A" * 10 + b"B" * 10)
    view = memoryview(request)
    store = _store(tmp_path)
    try:
        store.push([("a", 0, view[:10]), ("b", 0, view[10:])])
        request[:] = b"Z" * 20
        assert dict(store.lease(2)) == {"a": b"A" * 10, "b": b"B" * 10}
    finally:
        store.close()


def test_a_failed_bind_releases_the_directory_for_the_next_server(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises((OSError, RuntimeError)):
            BufferServer(tmp_path, port=taken.getsockname()[1]).start()
        with BufferServer(tmp_path, port=0) as server:
            assert server.port > 0
    finally:
        taken.close()


def test_the_push_encoder_refuses_top_k_ids_without_their_log_probs():
    r = 4
    sample = Sample("t1", np.arange(8), r, rollout_logp=np.full(r, -0.5),
                    teacher_topk_ids=np.zeros((r, 2), np.int32))
    with pytest.raises(SampleError, match="teacher_topk_logp"):
        wire.encode_sample(sample)


def test_a_failed_segment_rotation_leaves_no_closed_descriptor_behind(tmp_path, monkeypatch):
    log = WriteAheadLog(tmp_path, segment_bytes=64)
    list(log.replay())
    log.append([(RecordType.POLICY, b"x" * 100)])   # the active segment is over its size
    real_open = os.open

    def failing_open(path, flags, *args):
        if str(path).endswith("wal-00000002.log"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, *args)

    monkeypatch.setattr(wal_mod.os, "open", failing_open)
    with pytest.raises(WalClosedError, match="Too many open files"):
        log.append([(RecordType.POLICY, b"y")])
    monkeypatch.undo()
    with open(tmp_path / "unrelated.txt", "w") as other:   # may get the freed number
        log.close()
        other.write("still mine")
        other.flush()
    assert (tmp_path / "unrelated.txt").read_text() == "still mine"


def test_disk_bytes_skips_a_segment_deleted_while_it_counts(tmp_path, monkeypatch):
    log = WriteAheadLog(tmp_path, segment_bytes=64)
    list(log.replay())
    log.append([(RecordType.POLICY, b"x" * 100)])
    log.append([(RecordType.POLICY, b"y" * 10)])
    sizes = {p.name: p.stat().st_size for p in log.dir.glob("wal-*.log")}
    real_stat = pathlib.Path.stat

    def stat(self, *args, **kwargs):
        if self.name == "wal-00000001.log":
            raise FileNotFoundError(self)
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", stat)
    assert log.disk_bytes() == sizes["wal-00000002.log"]
    monkeypatch.undo()
    log.close()


def test_concurrent_policy_announcements_leave_memory_and_the_wal_agreeing(tmp_path):
    """The first announcement is durable but not yet in memory when a second one arrives: the
    second waits for it, so the version in memory is the WAL's last after a restart too."""
    store = _store(tmp_path)
    real = store.wal.append
    first_durable, go_on = threading.Event(), threading.Event()

    def append(records):
        seg = real(records)
        if not first_durable.is_set():
            first_durable.set()
            go_on.wait(10)
        return seg

    store.wal.append = append
    first = threading.Thread(target=store.set_policy_version, args=(5,), daemon=True)
    first.start()
    assert first_durable.wait(10)
    second = threading.Thread(target=store.set_policy_version, args=(3,), daemon=True)
    second.start()
    second.join(0.5)
    go_on.set()
    first.join(10)
    second.join(10)
    in_memory = store.policy_version
    store.close()
    reopened = _store(tmp_path)
    try:
        assert in_memory == reopened.policy_version == 3
    finally:
        reopened.close()


def test_a_restart_under_a_message_limit_a_held_sample_exceeds_is_refused(tmp_path):
    """A sample accepted under a larger --max-message-bytes would sit at the queue's head
    failing every Lease that reaches it: the restart is refused naming the limit and the size
    needed, and under the old limit the sample is still there and leases."""
    big = Sample("big", np.arange(8), 4, rollout_logp=np.full(4, -0.5),
                 metadata={"pad": "p" * 300_000})
    with BufferServer(tmp_path, max_message_bytes=1 << 20, fsync=False) as server, \
            BufferClient(server.address, retry_budget_s=10) as client:
        assert client.push([big]) == (1, 0)
    small = BufferServer(tmp_path, max_message_bytes=200_000, fsync=False)
    with pytest.raises(ValueError, match=r"max_message_bytes \(--max-message-bytes\) = 200000"
                                         r".* holds a sample of 3\d{5} bytes.*at least 3\d{5}"):
        small.start()
    assert small.store is None   # released: the directory opens again at once
    with BufferServer(tmp_path, max_message_bytes=1 << 20, fsync=False) as server, \
            BufferClient(server.address, retry_budget_s=10) as client:
        assert [s.sample_id for s in client.lease(4, timeout_s=5)] == ["big"]


def test_a_sample_as_large_as_a_push_can_carry_restarts_under_the_same_limit(tmp_path):
    """A Lease answer frames a sample exactly as the push that carried it did (a tag byte and
    a length varint), so a restart with the very flags it was accepted under starts and leases
    it (the start-up check counted 11 framing bytes and refused the restart)."""
    from clawjax.buffer import wire

    limit, pad = 1 << 16, 65_000
    for _ in range(4):   # the sample whose PushRequest is exactly `limit` bytes
        big = Sample("big", np.arange(8), 4, rollout_logp=np.full(4, -0.5),
                     metadata={"pad": "p" * pad})
        size = len(wire.encode_sample(big))
        pad += limit - (size + 1 + len(wire.varint(size)))
    assert 1 + len(wire.varint(size)) + size == limit
    with BufferServer(tmp_path, max_message_bytes=limit, fsync=False) as server, \
            BufferClient(server.address, retry_budget_s=10) as client:
        assert client.push([big]) == (1, 0)
    with BufferServer(tmp_path, max_message_bytes=limit, fsync=False) as server, \
            BufferClient(server.address, retry_budget_s=10) as client:
        assert [s.sample_id for s in client.lease(4, timeout_s=5)] == ["big"]
