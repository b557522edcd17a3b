"""`DoneSet` (clawjax/buffer/done_set.py) against a Python `set[str]` as the reference: the same
answers before, during and after consolidations, ties on the digests' high halves, lock-free
readers racing a consolidation, and the store using it across restarts."""

import random
import sys
import threading

import numpy as np
import pytest

from clawjax.buffer import done_set
from clawjax.buffer.done_set import DoneSet, _positions, digest
from clawjax.buffer.store import Store


@pytest.fixture
def small_merges(monkeypatch):
    """Consolidation thresholds small enough that a few hundred ids go through many merges."""
    monkeypatch.setattr(done_set, "MIN_RECENT", 7)
    monkeypatch.setattr(done_set, "GROWTH", 3)


def _ids(rng: random.Random, n: int) -> list[str]:
    return [f"session-{rng.randrange(10**9)}/turn-{rng.randrange(50)}" for _ in range(n)]


def test_membership_matches_a_python_set_through_many_consolidations(small_merges):
    rng = random.Random(0)
    reference, done = set(), DoneSet()
    pool = _ids(rng, 600) + ["", "ünïcode-id", "\ud800-lone-surrogate"]
    for step in range(400):
        batch = rng.sample(pool, rng.randrange(1, 6))
        if rng.random() < 0.5:
            done.update(batch)
        else:
            for sid in batch:
                done.add(sid)
        reference.update(batch)
        if step % 3 == 0:
            done.consolidate()
        queries = rng.sample(pool, 20)
        assert done.contains_many(queries) == [q in reference for q in queries]
        assert len(done) == len(reference)
    assert sum(done.consolidate(force=True) for _ in range(2)) >= 0
    hi, lo = done._sorted
    assert hi.shape[0] == len(reference) and not done._recent
    keys = list(zip(hi.tolist(), lo.tolist()))
    assert keys == sorted(set(keys))                       # sorted by (hi, lo), no repeats
    assert all((sid in done) == (sid in reference) for sid in pool)
    assert 42 not in done and done.contains_many([]) == []


def test_ids_added_again_after_consolidation_are_not_stored_twice(small_merges):
    done = DoneSet(f"a{i}" for i in range(50))
    done.update(f"a{i}" for i in range(25, 75))
    assert len(done) == 75
    done.consolidate(force=True)
    assert done._sorted[0].shape[0] == 75 and len(done) == 75


def test_positions_step_through_ties_on_the_high_half():
    """Digest halves with equal `hi` (astronomically rare for real ids, so built by hand)."""
    hi = np.array([1, 5, 5, 5, 5, 9], np.uint64)
    lo = np.array([0, 2, 4, 6, 8, 0], np.uint64)
    qhi = np.array([5, 5, 5, 5, 0, 9, 10, 5], np.uint64)
    qlo = np.array([1, 4, 7, 9, 0, 0, 0, 2], np.uint64)
    keys = list(zip(hi.tolist(), lo.tolist()))
    expect = [sum(key < query for key in keys) for query in zip(qhi.tolist(), qlo.tolist())]
    assert _positions(hi, lo, qhi, qlo).tolist() == expect == [1, 2, 4, 5, 0, 5, 6, 1]


def test_consolidation_merges_keys_that_tie_on_the_high_half(monkeypatch):
    """Digests forced to share their first 8 bytes still merge into (hi, lo) order and are found."""
    real = done_set.digests
    monkeypatch.setattr(done_set, "digests", lambda ids: [b"\x07" * 8 + d[8:] for d in real(ids)])
    ids = [f"tie-{i}" for i in range(40)]
    done = DoneSet(ids[:20])
    done.update(ids[20:30])
    done.consolidate(force=True)
    hi, lo = done._sorted
    assert set(hi.tolist()) == {int.from_bytes(b"\x07" * 8, "little")}
    assert lo.tolist() == sorted(lo.tolist()) and len(set(lo.tolist())) == 30
    assert done.contains_many(ids) == [True] * 30 + [False] * 10


def test_readers_never_miss_an_id_while_consolidations_run(monkeypatch):
    """Every id added before a reader's call is found by it, whatever a concurrent
    consolidation is doing (readers take no lock). Merges every 7 recent ids."""
    monkeypatch.setattr(done_set, "MIN_RECENT", 7)
    monkeypatch.setattr(done_set, "GROWTH", 1 << 62)
    done, added, stop, misses = DoneSet(), [], threading.Event(), []
    reads, merges = [0], [0]

    def read():
        rng = random.Random(1)
        while not stop.is_set():
            upto = len(added)
            if upto:
                picks = [added[rng.randrange(upto)] for _ in range(8)]
                if not all(done.contains_many(picks)):
                    misses.append(picks)
                reads[0] += 1

    def merge():
        while not stop.is_set():
            merges[0] += bool(done.consolidate())

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)   # hand the GIL over often: fine-grained interleaving
    threads = [threading.Thread(target=read), threading.Thread(target=merge)]
    for t in threads:
        t.start()
    try:   # keep adding until both sides have interleaved with the adds many times
        i = 0
        while (reads[0] < 2000 or merges[0] < 200) and i < 1_000_000:
            sid = f"id-{i}"
            done.add(sid)
            added.append(sid)
            i += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(switch)
    assert reads[0] >= 2000 and merges[0] >= 200
    assert not misses
    assert len(done) == len(added)


def test_memory_per_id_is_a_fraction_of_a_python_set():
    done = DoneSet(f"session-{i:09d}/turn-3" for i in range(200_000))
    hi, lo = done._sorted
    assert not done._recent and hi.nbytes + lo.nbytes == 200_000 * 16
    assert done.nbytes < 200_000 * 17          # a Python set of these ids: ~107 bytes per id
    done.update(f"later-{i}" for i in range(1000))
    assert done.nbytes > 200_000 * 16 + 1000 * len(digest("x"))


def test_store_ignores_pushes_of_finished_ids_across_restarts_and_compactions(tmp_path,
                                                                             small_merges):
    """Finished ids live in the WAL's DONE records, then in done.log after a compaction; either
    way a later push of them is a duplicate, and live samples come back after a restart."""
    store = Store(tmp_path, segment_bytes=4096, compact_interval_s=3600)
    try:
        store.push([(f"s{i}", 0, b"x" * 100) for i in range(120)])
        acked = [sid for sid, _ in store.lease(80)]
        assert store.ack(acked) == (80, 0)
        store.maybe_compact(force=True)
        assert store.push([(f"s{i}", 0, b"x" * 100) for i in range(130)]) == (10, 120)
    finally:
        store.close()
    store = Store(tmp_path, segment_bytes=4096, compact_interval_s=3600)
    try:
        assert store.done_log.ids() and len(store._done) == 80
        assert store.push([(sid, 0, b"x" * 100) for sid in acked]) == (0, 80)
        live = sorted(sid for sid, _ in store.lease(1000))
        assert live == sorted(f"s{i}" for i in range(80, 130))
    finally:
        store.close()
