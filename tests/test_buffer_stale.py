"""stale.log holds each sample at most once: moving a stale sample aside is a stale.log write
then a DONE record in the WAL, and when the second fails (or the process dies between them) the
sample is held again and moved aside again later; its copy must not be written again. Faults
are injected at the store's WAL seam and at the append-only log's fsync."""

import errno

import pytest

from clawjax.buffer import wal as wal_mod
from clawjax.buffer.store import Store
from clawjax.buffer.wal import RecordType, read_stale


def _store(path, **kw) -> Store:
    return Store(path, compact_interval_s=3600, max_staleness=0, **kw)


def _fail_next_done(store: Store) -> None:
    """The store's next WAL append holding a DONE record fails with EIO; later ones work."""
    real, state = store.wal.append, {"armed": True}

    def append(records):
        records = list(records)
        if state["armed"] and any(rtype == RecordType.DONE for rtype, _ in records):
            state["armed"] = False
            raise OSError(errno.EIO, "I/O error")
        return real(records)

    store.wal.append = append


def _stale_ids(path) -> list[str]:
    return [sid for sid, _, _ in read_stale(path)]


def test_a_sample_whose_done_write_failed_is_not_copied_to_stale_log_again(tmp_path):
    store = _store(tmp_path)
    try:
        store.push([("old", 0, b"o"), ("new", 5, b"n")])
        _fail_next_done(store)
        with pytest.raises(OSError, match="I/O error"):
            store.set_policy_version(5)           # copied to stale.log, DONE failed: held again
        assert store.stats()["queued"] == 2 and store.stats()["stale_total"] == 0
        assert [sid for sid, _ in store.lease(5)] == ["new"]   # moves "old" aside again
        stats = store.stats()
        assert (stats["queued"], stats["stale_total"]) == (0, 1)
        assert store.stale_log.pending == set()
    finally:
        store.close()
    assert _stale_ids(tmp_path) == ["old"]


def test_a_restart_between_the_stale_copy_and_its_done_does_not_copy_it_again(tmp_path):
    store = _store(tmp_path)
    store.push([("old", 0, b"o"), ("kept", 3, b"k")])
    _fail_next_done(store)
    with pytest.raises(OSError, match="I/O error"):
        store.set_policy_version(3)
    store.close()                                   # as a crash before the DONE record
    assert _stale_ids(tmp_path) == ["old"]
    store = _store(tmp_path)                        # the sweep on open moves "old" aside
    try:
        stats = store.stats()
        assert (stats["queued"], stats["stale_total"]) == (1, 1)
        assert store.stale_log.pending == set()
    finally:
        store.close()
    assert _stale_ids(tmp_path) == ["old"]


def test_a_stale_log_write_whose_fsync_failed_is_cut_back_and_written_once_on_retry(
        tmp_path, monkeypatch):
    store = _store(tmp_path)
    try:
        store.push([("old", 0, b"o")])
        real, state = wal_mod.os.fsync, {"armed": True}

        def fsync(fd):   # the WAL fdatasyncs: the first fsync is stale.log's append
            if state["armed"]:
                state["armed"] = False
                raise OSError(errno.EIO, "I/O error")
            return real(fd)

        monkeypatch.setattr(wal_mod.os, "fsync", fsync)
        with pytest.raises(OSError, match="I/O error"):
            store.set_policy_version(1)
        assert not state["armed"] and store.stats()["queued"] == 1
        assert store.set_policy_version(1) == 1
    finally:
        store.close()
    assert _stale_ids(tmp_path) == ["old"]


def test_a_restart_under_a_looser_bound_does_not_copy_it_again_when_it_goes_stale(tmp_path):
    """A sample copied to stale.log whose DONE was lost is held again; restarted with a larger
    --max-staleness it is not stale (delivered, or held as here), and when it goes stale again
    later its copy is not written a second time."""
    store = _store(tmp_path)
    store.push([("old", 0, b"o"), ("kept", 3, b"k")])
    _fail_next_done(store)
    with pytest.raises(OSError, match="I/O error"):
        store.set_policy_version(3)
    store.close()                                   # as a crash before the DONE record
    store = Store(tmp_path, compact_interval_s=3600, max_staleness=5)
    try:
        assert store.stats()["queued"] == 2         # 3 - 0 ≤ 5: not stale now
        assert store.set_policy_version(6) == 1     # 6 - 0 > 5: moved aside, not copied again
        assert store.stale_log.pending == set()
    finally:
        store.close()
    assert _stale_ids(tmp_path) == ["old"]


def test_stale_log_records_read_on_open_are_not_kept(tmp_path):
    """stale.log is read whole on open (torn-tail check); the store matches its ids against
    the held samples then and keeps none of its bytes."""
    store = _store(tmp_path)
    store.push([("old", 0, b"o" * 4096), ("kept", 3, b"k")])
    store.set_policy_version(3)                     # "old" moved aside for good
    store.close()
    for held in (True, False):
        store = _store(tmp_path)
        try:
            assert store.stats()["queued"] == (1 if held else 0)
            assert store.stale_log.log._opened is None and store.stale_log.pending == set()
            if held:
                store.ack(["kept"])
        finally:
            store.close()
    assert _stale_ids(tmp_path) == ["old"]


def _record_bytes(sid: str, data: bytes) -> int:
    return 9 + 10 + len(sid.encode()) + len(data)   # header, version and id length, id, sample


def test_stale_log_is_rotated_past_half_its_cap_and_keeps_the_newest_copies(tmp_path):
    """Each stale sample's whole bytes go to stale.log: past half of `max_stale_bytes` it is
    rotated to stale.log.1 (the older rotation dropped), so the two files stay within the cap
    however many samples go stale, and the newest copies are the ones kept, in order."""
    data, cap = b"x" * 1000, 8000
    store = _store(tmp_path, max_stale_bytes=cap)
    try:
        for i in range(20):
            store.push([(f"s{i:02d}", 0, data)])
            store.set_policy_version(i + 1)        # s{i} is moved aside alone
            held = sum(p.stat().st_size for p in tmp_path.glob("stale.log*"))
            assert held <= cap, f"after {i + 1} samples moved aside: {held} bytes kept"
        assert store.stats()["stale_total"] == 20
    finally:
        store.close()
    kept = _stale_ids(tmp_path)
    per_file = (cap // 2 - 8) // _record_bytes("s00", data)      # 3 copies per file
    assert kept == [f"s{i:02d}" for i in range(20 - len(kept), 20)]
    assert per_file + 1 <= len(kept) <= 2 * per_file
    assert sorted(p.name for p in tmp_path.glob("stale.log*")) == ["stale.log", "stale.log.1"]


def test_a_rotation_that_cannot_write_its_new_file_leaves_the_log_as_it_was(tmp_path,
                                                                             monkeypatch):
    """The new stale.log is written aside before the old one is renamed away: a full disk at
    that moment fails the append (the sample stays held) and leaves stale.log in place, so the
    appends after it work. It used to leave no stale.log: every later append failed until the
    buffer restarted."""
    from clawjax.buffer.stale import StaleLog

    log = StaleLog(tmp_path, fsync=False, max_bytes=4000)
    log.append([("a", 0, b"x" * 1500)])
    real = StaleLog._write_empty

    def full_disk(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(StaleLog, "_write_empty", full_disk)
    with pytest.raises(OSError, match="No space left"):
        log.append([("b", 0, b"x" * 1500)])   # past half the cap: a rotation first
    monkeypatch.setattr(StaleLog, "_write_empty", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stale.log"]
    log.append([("c", 0, b"x" * 10)])
    log.append([("d", 0, b"x" * 1500)])   # past half the cap again: rotates this time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stale.log", "stale.log.1"]
    assert [sid for sid, _, _ in read_stale(tmp_path)] == ["a", "c", "d"]


def test_a_pending_copy_rotated_to_stale_log_1_is_not_copied_again_after_a_restart(tmp_path):
    """A sample whose copy is durable and whose DONE is not is found pending on open in
    stale.log.1 as well as in stale.log: its copy is not written a second time."""
    data = b"x" * 1000
    store = _store(tmp_path, max_stale_bytes=8000)
    store.push([("old", 0, data), ("kept", 3, b"k")])
    _fail_next_done(store)
    with pytest.raises(OSError, match="I/O error"):
        store.set_policy_version(3)               # "old" copied, its DONE failed: held again
    store.close()                                  # as a crash before the DONE record
    store = Store(tmp_path, compact_interval_s=3600, max_staleness=5, max_stale_bytes=8000)
    try:
        assert [sid for sid, _ in store.lease(5)] == ["old", "kept"]   # 3 - 0 ≤ 5: not stale
        store.set_policy_version(20)
        for i in range(3):                         # stale on arrival: rotates once
            store.push([(f"n{i}", 0, data)])
        assert [sid for sid, _, _ in wal_mod.read_stale(tmp_path)][:1] == ["old"]
        assert (tmp_path / "stale.log.1").exists()
    finally:
        store.close()                              # "old" still leased, then forgotten
    store = Store(tmp_path, compact_interval_s=3600, max_staleness=5, max_stale_bytes=8000)
    try:
        assert store.stats()["queued"] == 0        # the sweep on open moved "old" aside
        assert store.stale_log.pending == set()
    finally:
        store.close()
    assert _stale_ids(tmp_path).count("old") == 1


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_a_stale_cap_that_is_not_a_positive_integer_is_refused_by_name(tmp_path, value):
    with pytest.raises(ValueError, match=r"max_stale_bytes \(--max-stale-bytes\) = .* expected "
                                         r"an integer ≥ 1"):
        _store(tmp_path, max_stale_bytes=value)
    assert not (tmp_path / "wal").exists()          # refused before anything was opened


def test_the_serve_command_takes_the_stale_cap(tmp_path, capsys):
    from clawjax.buffer.__main__ import _parser, main

    assert _parser().parse_args(["serve", "--port", "0", "--dir", str(tmp_path)]
                                ).max_stale_bytes == 256 << 20
    assert main(["serve", "--port", "0", "--dir", str(tmp_path), "--max-stale-bytes", "0"]) == 2
    assert "--max-stale-bytes" in capsys.readouterr().err
