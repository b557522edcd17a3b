"""Compaction and the done log: what a compaction keeps, finished ids written to `done.log`
once each (never rewritten by later compactions), and recovery from both files after a crash
at any point between them."""

import pathlib

import pytest

from clawjax.buffer import append_log as append_log_mod
from clawjax.buffer import rollout_pb2 as pb
from clawjax.buffer import wal as wal_mod
from clawjax.buffer.compaction import DoneLog, carry_over, ids_payload
from clawjax.buffer.done_set import digests
from clawjax.buffer.store import Store
from clawjax.buffer.wal import RecordType, encode_push, read_records


def _push(sid, data=b"x"):
    return RecordType.PUSH, b"".join(encode_push(sid, 0, data))


def _policy(version):
    return RecordType.POLICY, pb.PolicyVersion(version=version).SerializeToString()


def test_carry_over_keeps_the_last_policy_and_live_pushes_and_hands_on_finished_ids():
    records = [_policy(1), _push("a"), _push("b"), (RecordType.DONE, ids_payload(["a", "z"])),
               _push("c"), _policy(2), (RecordType.DONE, ids_payload(["b"]))]
    kept, finished = carry_over(records, done={"a", "b", "z"})
    assert kept == [_policy(2), _push("c")]
    assert finished == ["a", "b", "z"]      # in first-seen order, each once
    kept, finished = carry_over(records, done=set())   # DONE records not yet in `done`
    assert kept == [_policy(2), _push("a"), _push("b"), _push("c")]
    assert finished == ["a", "z", "b"]


def _wal_bytes(directory) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((pathlib.Path(directory) / "wal").glob("*.log")))


def _wal_done_ids(directory) -> list[str]:
    ids = []
    for path in sorted((pathlib.Path(directory) / "wal").glob("wal-*.log")):
        records, _, _ = read_records(path)
        ids += [s for t, p in records if t == RecordType.DONE
                for s in pb.SampleIds.FromString(p).sample_ids]
    return ids


def _round(store, prefix, n=30):
    """Pushes n samples (several segments), acks them all, then pushes ten fillers, one at a
    time, so that the segment holding the acks' DONE records is sealed too."""
    ids = [f"{prefix}-{i:04d}" for i in range(n)]
    for i in range(0, n, 10):
        store.push([(sid, 0, b"p" * 500) for sid in ids[i:i + 10]])
    assert sorted(s for s, _ in store.lease(n)) == ids
    store.ack(ids)
    for i in range(10):
        store.push([(f"{prefix}-fill-{i}", 0, b"f" * 500)])
    return ids


def test_each_finished_id_goes_to_the_done_log_once_and_leaves_the_wal(tmp_path):
    store = Store(tmp_path, segment_bytes=4 << 10, compact_interval_s=3600)
    first = _round(store, "first")
    assert store.maybe_compact(force=True) > 0
    assert store.done_log.ids() == first
    assert b"first-0007" not in _wal_bytes(tmp_path).replace(b"first-fill", b"")

    store.ack([s for s, _ in store.lease(10)])    # the first round's fillers
    second = _round(store, "second")
    assert store.maybe_compact(force=True) > 0
    logged = store.done_log.ids()
    assert len(logged) == len(set(logged))           # nothing written twice
    assert set(logged) >= set(first + second)
    assert logged[:len(first)] == first              # the first compaction's part untouched
    assert not set(_wal_done_ids(tmp_path)) & set(first + second)
    store.close()

    store = Store(tmp_path, compact_interval_s=3600)
    assert store.push([("first-0003", 0, b"again"), ("second-0029", 0, b"again"),
                       ("third-0000", 0, b"new")]) == (1, 2)
    live = sorted(s for s, _ in store.lease(100))
    assert live == sorted([f"second-fill-{i}" for i in range(10)] + ["third-0000"])
    store.close()


@pytest.mark.parametrize("fail_at", ["replace", "unlink"])
def test_a_crash_inside_compaction_after_the_done_log_append_replays_the_same(
        tmp_path, monkeypatch, fail_at):
    store = Store(tmp_path, segment_bytes=4 << 10, compact_interval_s=3600)
    acked = _round(store, "a")

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    if fail_at == "replace":  # done.log appended, compacted segment not yet in place
        monkeypatch.setattr(wal_mod.os, "replace", crash)
    else:                     # compacted segment in place, old segments not yet deleted
        monkeypatch.setattr(wal_mod.pathlib.Path, "unlink", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.maybe_compact(force=True)
    monkeypatch.undo()
    assert set(store.done_log.ids()) == set(acked)
    store.wal.close()
    store._stop.set()

    store = Store(tmp_path, compact_interval_s=3600)
    assert store.push([(sid, 0, b"again") for sid in acked[:5]]) == (0, 5)
    assert sorted(s for s, _ in store.lease(100)) == [f"a-fill-{i}" for i in range(10)]
    store.close()


def test_done_log_truncates_a_torn_tail_and_keeps_what_came_before(tmp_path):
    log = DoneLog(tmp_path)
    log.append(["x1", "x2"])
    log.append(["y1", "y2", "y3"])
    path = tmp_path / "done.log"
    path.write_bytes(path.read_bytes()[:-3])
    log = DoneLog(tmp_path)
    assert log.ids() == ["x1", "x2"]
    log.append(["z1"])
    assert DoneLog(tmp_path).ids() == ["x1", "x2", "z1"]


def test_done_log_is_read_from_disk_once_at_start_up_and_again_after_an_append(
        tmp_path, monkeypatch):
    """The records read on open (tail check) serve the first `records()`; an append in
    between, or a second call, reads the file again, so nothing appended is missed."""
    DoneLog(tmp_path).append(["a1", "a2"])
    reads = []
    real = append_log_mod.read_records
    monkeypatch.setattr(append_log_mod, "read_records",
                        lambda path, copy=True: reads.append(path) or real(path, copy))
    log = DoneLog(tmp_path)
    assert list(log.key_chunks()) == [b"".join(digests(["a1", "a2"]))]
    assert len(reads) == 1
    assert log.ids() == ["a1", "a2"]
    assert len(reads) == 2
    log = DoneLog(tmp_path)
    log.append(["b1"])
    assert log.ids() == ["a1", "a2", "b1"]
    assert len(reads) == 4


def test_done_log_stores_each_ids_digest_and_reads_older_records_by_hashing(tmp_path):
    """New records carry the ids' digests (read back without hashing); records written before
    digests were stored (plain `SampleIds`) are hashed when read; both in one file, in order."""
    log = DoneLog(tmp_path)
    log.append_records([(RecordType.DONE, ids_payload(["old-1", "old-2"]))])   # older format
    log.append(["new-1", "new-2", "new-3"])
    log = DoneLog(tmp_path)
    (_, old), (_, new) = log.records()
    stored = pb.DoneIds.FromString(new)
    assert list(stored.sample_ids) == ["new-1", "new-2", "new-3"]
    assert stored.digests == b"".join(digests(["new-1", "new-2", "new-3"]))
    assert pb.DoneIds.FromString(old).digests == b""
    assert list(pb.SampleIds.FromString(new).sample_ids) == ["new-1", "new-2", "new-3"]
    assert log.ids() == ["old-1", "old-2", "new-1", "new-2", "new-3"]
    assert list(log.key_chunks()) == [b"".join(digests(["old-1", "old-2"])), stored.digests]


def test_done_log_key_chunks_trust_the_stored_digests_and_refuse_partial_keys(tmp_path):
    """`key_chunks` reads a record's digests, not its ids (a hand-made record whose digests are
    another id's shows which was read); digests that are not whole keys are refused by name."""
    log = DoneLog(tmp_path)
    log.append_records([(RecordType.DONE, pb.DoneIds(
        sample_ids=["a"], digests=b"".join(digests(["b"]))).SerializeToString())])
    assert list(log.key_chunks()) == [b"".join(digests(["b"]))]
    log.append_records([(RecordType.DONE, pb.DoneIds(
        sample_ids=["c"], digests=b"\x01" * 15).SerializeToString())])
    with pytest.raises(ValueError, match=r"done.log record 1: digests of 15 bytes, expected 16 "
                                         r"bytes per id"):
        list(log.key_chunks())


def test_a_store_restarts_on_a_done_log_written_before_digests_were_stored(tmp_path):
    DoneLog(tmp_path).append_records([(RecordType.DONE, ids_payload(["old-1", "old-2"]))])
    store = Store(tmp_path, compact_interval_s=3600)
    try:
        assert len(store._done) == 2
        assert store.push([("old-1", 0, b"again"), ("new", 0, b"x")]) == (1, 1)
    finally:
        store.close()


def test_a_wal_that_holds_done_lists_in_sealed_segments_still_replays_and_compacts(tmp_path):
    """A directory compacted before the done log existed: its compacted segment carries the
    finished ids as DONE records. They stay finished, and the next compaction moves them."""
    old = wal_mod.WriteAheadLog(tmp_path, segment_bytes=1 << 10)
    list(old.replay())
    old.append([(RecordType.DONE, ids_payload(["old-1", "old-2"])), _push("live")])
    for i in range(4):   # seals the first segment
        old.append([_push(f"pad-{i}", b"p" * 600)])
    old.close()
    store = Store(tmp_path, segment_bytes=1 << 10, compact_interval_s=3600)
    assert store.push([("old-1", 0, b"again")]) == (0, 1)
    store.maybe_compact(force=True)
    assert store.done_log.ids() == ["old-1", "old-2"]
    assert "old-1" not in _wal_done_ids(tmp_path)
    store.close()
    store = Store(tmp_path, compact_interval_s=3600)
    assert store.push([("old-2", 0, b"again")]) == (0, 1)
    assert "live" in {s for s, _ in store.lease(100)}
    store.close()
