"""Write-ahead log: checksummed records, torn-tail truncation, group commit, compaction, and the
store rebuilt from it."""

import os
import threading
import time

import pytest

from clawjax.buffer import wal as wal_mod
from clawjax.buffer.store import Store
from clawjax.buffer.wal import (HEADER, MAGIC, RecordType, WalCorruptError, WriteAheadLog,
                                decode_push, encode_push, push_id, scan_records)


def _records(n, size=40):
    return [(RecordType.PUSH, b"".join(encode_push(f"id{i}", i, bytes([i % 251]) * size)))
            for i in range(n)]


def _replay(directory):
    log = WriteAheadLog(directory)
    got = [(t, p) for _, t, p in log.replay()]
    log.close()
    return got


def test_short_writev_writes_everything_in_order(tmp_path, monkeypatch):
    real = os.writev
    monkeypatch.setattr(wal_mod.os, "writev", lambda fd, bufs: real(fd, [bytes(bufs[0])[:3]]))
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    bufs = [b"hello", memoryview(b"world!"), b"", b"xy" * 700]
    assert wal_mod._writev_all(fd, bufs) == 5 + 6 + 1400
    os.close(fd)
    assert path.read_bytes() == b"helloworld!" + b"xy" * 700


def test_multi_part_payloads_round_trip(tmp_path):
    log = WriteAheadLog(tmp_path)
    list(log.replay())
    log.append([(RecordType.PUSH, encode_push("p", 9, memoryview(b"payload-bytes")))])
    log.close()
    [(rtype, payload)] = _replay(tmp_path)
    assert rtype == RecordType.PUSH and decode_push(payload) == ("p", 9, b"payload-bytes")


def test_append_replay_round_trip(tmp_path):
    log = WriteAheadLog(tmp_path)
    assert list(log.replay()) == []
    recs = _records(10)
    for r in recs:
        log.append([r])
    log.close()
    assert _replay(tmp_path) == recs
    assert decode_push(recs[3][1]) == ("id3", 3, bytes([3]) * 40)


@pytest.mark.parametrize("cut", [1, 5, 9, 10, 30, 48])
def test_torn_tail_is_truncated_and_everything_before_survives(tmp_path, cut):
    log = WriteAheadLog(tmp_path)
    list(log.replay())
    recs = _records(5)
    log.append(recs)
    log.close()
    seg = tmp_path / "wal" / "wal-00000001.log"
    size = seg.stat().st_size
    last = len(wal_mod.encode_record(*recs[-1]))
    os.truncate(seg, size - last + cut)  # keep `cut` bytes of the last record
    assert _replay(tmp_path) == recs[:-1]
    assert seg.stat().st_size == size - last  # the torn bytes are gone from disk
    log = WriteAheadLog(tmp_path)  # and appending after recovery works
    list(log.replay())
    log.append([recs[-1]])
    log.close()
    assert _replay(tmp_path) == recs


def test_flipped_byte_in_tail_is_caught_by_checksum(tmp_path):
    log = WriteAheadLog(tmp_path)
    list(log.replay())
    recs = _records(3)
    log.append(recs)
    log.close()
    seg = tmp_path / "wal" / "wal-00000001.log"
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0xFF
    seg.write_bytes(bytes(data))
    assert _replay(tmp_path) == recs[:-1]


def test_damage_inside_a_sealed_segment_is_an_error_not_a_truncation(tmp_path):
    log = WriteAheadLog(tmp_path, segment_bytes=200)
    list(log.replay())
    for r in _records(8):
        log.append([r])
    log.close()
    first = tmp_path / "wal" / "wal-00000001.log"
    assert len(list((tmp_path / "wal").glob("wal-*.log"))) > 1
    data = bytearray(first.read_bytes())
    data[len(MAGIC) + 12] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(WalCorruptError, match="wal-00000001.log"):
        _replay(tmp_path)


def _corrupt_push_payload(tmp_path, seg: int, sample_id: str) -> None:
    """Flips the last byte of `sample_id`'s PUSH payload in segment `seg` (its header and id
    stay readable)."""
    path = tmp_path / "wal" / f"wal-{seg:08d}.log"
    data = bytearray(path.read_bytes())
    records, _, _, _ = scan_records(memoryview(bytes(data)), verify_push=False)
    off = len(MAGIC)
    for rtype, payload in records:
        off += HEADER.size + len(payload)
        if rtype == RecordType.PUSH and push_id(payload) == sample_id:
            data[off - 1] ^= 0xFF
            path.write_bytes(bytes(data))
            return
    raise AssertionError(f"no PUSH of {sample_id} in {path}")


def test_compaction_verifies_the_records_it_keeps_and_skips_the_dead(tmp_path):
    """Compaction reads a dead sample's record header only: damage in its payload is dropped
    with it; damage in a payload it carries over is a `WalCorruptError` (nothing replaced)."""
    store = Store(tmp_path, segment_bytes=4 << 10, compact_interval_s=3600)
    store.push([(f"a{i}", 0, b"x" * 600) for i in range(12)])
    store.ack([f"a{i}" for i in range(11)])          # a11 stays live
    store.push([(f"b{i}", 0, b"y" * 600) for i in range(12)])   # seals a's segments
    seg_of = {sid: e.seg for sid, e in store._entries.items()}
    assert seg_of["a11"] < store.wal._active
    dead_seg = min(store.wal.sealed())
    _corrupt_push_payload(tmp_path, dead_seg, "a0")
    _corrupt_push_payload(tmp_path, seg_of["a11"], "a11")
    segs_before = store.wal.segments()
    with pytest.raises(WalCorruptError, match="checksum mismatch"):
        store.maybe_compact(force=True)
    assert store.wal.segments() == segs_before         # nothing replaced or deleted
    store.close()


def test_compaction_drops_a_damaged_dead_record_and_keeps_the_live(tmp_path):
    store = Store(tmp_path, segment_bytes=4 << 10, compact_interval_s=3600)
    store.push([(f"a{i}", 0, b"x" * 600) for i in range(12)])
    store.ack([f"a{i}" for i in range(11)])
    store.push([(f"b{i}", 0, b"y" * 600) for i in range(12)])
    _corrupt_push_payload(tmp_path, min(store.wal.sealed()), "a0")
    assert store.maybe_compact(force=True) > 0
    store.close()
    store = Store(tmp_path, compact_interval_s=3600)   # the damaged record is gone for good
    got = dict(store.lease(100))
    assert sorted(got) == sorted(["a11"] + [f"b{i}" for i in range(12)])
    assert bytes(got["a11"]) == b"x" * 600
    store.close()


def test_concurrent_appends_share_one_fsync(tmp_path, monkeypatch):
    """While one append's group is inside its fsync, every append that arrives queues (none
    returns before it), and the next leader writes all of them and fsyncs once."""
    gate, inside = threading.Event(), threading.Event()
    real = os.fdatasync
    calls = []

    def slow_fdatasync(fd):
        calls.append(fd)
        if len(calls) == 1:
            inside.set()
            gate.wait(30)
        real(fd)

    monkeypatch.setattr(wal_mod.os, "fdatasync", slow_fdatasync)
    log = WriteAheadLog(tmp_path)
    list(log.replay())
    recs = _records(17)
    first = threading.Thread(target=log.append, args=([recs[0]],))
    first.start()
    assert inside.wait(30)
    threads = [threading.Thread(target=log.append, args=([r],)) for r in recs[1:]]
    for t in threads:
        t.start()
    for _ in range(30_000):  # wait until all 16 are queued behind the first group's fsync
        with log._cv:
            if len(log._pending) == 16:
                break
        time.sleep(0.001)
    else:
        pytest.fail("appends did not queue up")
    with log._cv:
        assert not any(w.done for w in log._pending)
    gate.set()
    for t in [first, *threads]:
        t.join()
    assert len(calls) == 2 and log.fsyncs_total == 2
    log.close()
    assert sorted(_replay(tmp_path)) == sorted(recs)


def test_store_compaction_bounds_the_log_and_keeps_state(tmp_path):
    store = Store(tmp_path, segment_bytes=8 << 10, compact_interval_s=3600)
    for batch in range(20):
        items = [(f"s{batch}-{i}", 0, b"x" * 500) for i in range(20)]
        store.push(items)
        leased = store.lease(20)
        ids = [sid for sid, _ in leased]
        if batch == 19:
            store.ack(ids[:10])      # s19-10..19 stay live (leased)
        else:
            store.ack(ids)
    before = store.wal.disk_bytes()
    assert before > 200_000 and len(store.wal.segments()) > 10
    reclaimed = store.maybe_compact()
    after = store.wal.disk_bytes()
    assert reclaimed > 0 and after < 40_000, (before, after)
    assert len(store.wal.segments()) <= 2
    store.close()
    store = Store(tmp_path, compact_interval_s=3600)   # leases are not persisted
    assert store.stats()["queued"] == 10
    assert sorted(s for s, _ in store.lease(100)) == sorted(f"s19-{i}" for i in range(10, 20))
    assert store.push([("s3-4", 0, b"again")]) == (0, 1)   # acked ids stay known
    store.close()


def test_crash_between_compaction_rename_and_delete_replays_the_same(tmp_path, monkeypatch):
    store = Store(tmp_path, segment_bytes=4 << 10, compact_interval_s=3600)
    store.push([(f"a{i}", 0, b"y" * 400) for i in range(30)])
    store.ack([s for s, _ in store.lease(20)])
    store.push([("tail", 0, b"z")])
    segs_before = store.wal.segments()
    monkeypatch.setattr(wal_mod.pathlib.Path, "unlink", lambda self, missing_ok=False: None)
    store.maybe_compact(force=True)     # old segments survive next to the compacted one
    monkeypatch.undo()
    assert store.wal.compactions_total == 1 and store.wal.segments() == segs_before
    (tmp_path / "wal" / "junk.tmp").write_bytes(b"half-written compaction")
    store.wal.close()
    store._stop.set()
    store = Store(tmp_path, compact_interval_s=3600)
    assert sorted(s for s, _ in store.lease(100)) == sorted([f"a{i}" for i in range(20, 30)]
                                                             + ["tail"])
    assert not (tmp_path / "wal" / "junk.tmp").exists()
    store.close()


def test_concurrent_ack_of_the_same_id_returns_only_once_durable(tmp_path, monkeypatch):
    """A retried ack that finds the id mid-finish must wait for that DONE to be durable."""
    store = Store(tmp_path, compact_interval_s=3600)
    store.push([("a", 0, b"x")])
    store.lease(1)
    gate, inside = threading.Event(), threading.Event()
    real_append = store.wal.append

    def slow_append(records):
        inside.set()
        gate.wait(30)
        return real_append(records)

    monkeypatch.setattr(store.wal, "append", slow_append)
    first = threading.Thread(target=store.ack, args=(["a"],))
    first.start()
    assert inside.wait(30)
    second_done = threading.Event()
    result = []
    second = threading.Thread(target=lambda: (result.append(store.ack(["a"])), second_done.set()))
    second.start()
    assert not second_done.wait(0.3)   # it is waiting for the first ack's fsync
    gate.set()
    first.join()
    second.join()
    assert result == [(0, 1)] and "a" in store._done
    store.close()


def test_stale_samples_met_by_lease_are_moved_aside(tmp_path):
    store = Store(tmp_path, max_staleness=1, compact_interval_s=3600)
    store.push([("old", 0, b"o"), ("new", 5, b"n")])
    store.policy_version = 5   # as if announced without a sweep
    assert [sid for sid, _ in store.lease(10)] == ["new"]
    assert store.stats()["stale_total"] == 1
    store.close()
    assert [sid for sid, _, _ in wal_mod.read_stale(tmp_path)] == ["old"]


def test_after_a_write_error_the_log_refuses_everything(tmp_path, monkeypatch):
    log = WriteAheadLog(tmp_path)
    list(log.replay())
    log.append(_records(1))

    def broken(fd, bufs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wal_mod, "_writev_all", broken)
    with pytest.raises(wal_mod.WalClosedError, match="No space left"):
        log.append(_records(2)[1:])
    monkeypatch.undo()
    with pytest.raises(wal_mod.WalClosedError, match="write failure"):
        log.append(_records(3)[2:])
    log.close()
    assert _replay(tmp_path) == _records(1)


def test_short_writev_of_non_byte_views_counts_bytes(tmp_path, monkeypatch):
    import numpy as np
    real = os.writev
    monkeypatch.setattr(wal_mod.os, "writev", lambda fd, bufs: real(fd, [bytes(bufs[0])[:5]]))
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    ints = np.arange(7, dtype="<i4")
    bufs = [memoryview(ints), b"|", memoryview(ints[:0]), memoryview(b"ab").cast("B")]
    assert wal_mod._writev_all(fd, bufs) == 28 + 1 + 2
    os.close(fd)
    assert path.read_bytes() == ints.tobytes() + b"|ab"
