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
    """stale.log keeps every stale sample ever and is read whole on open (torn-tail check);
    the store matches its ids against the held samples then and keeps none of its bytes."""
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
