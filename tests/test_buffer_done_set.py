"""`DoneSet` (clawjax/buffer/done_set.py) against a Python `set[str]` as the reference: the same
answers before, during and after consolidations, ties on the digests' high halves, lock-free
readers racing a consolidation, and the store using it across restarts."""

import random
import sys
import threading

import numpy as np
import pytest

from clawjax.buffer import done_set
from clawjax.buffer.done_set import DoneSet, _positions, _sorted_unique, digest, digests
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


def _key(hi: int, lo: int) -> bytes:
    """A hand-made 16-byte digest with the given halves (little-endian, as the arrays read them)."""
    return hi.to_bytes(8, "little") + lo.to_bytes(8, "little")


def test_sorted_unique_orders_by_both_halves_and_drops_repeats():
    rng = random.Random(3)
    for n in (0, 1, 2, 50, 400):
        # few distinct `hi` values: ties on the high half and whole repeats in every case
        keys = [(rng.randrange(4) * 2**61, rng.randrange(6) * 2**60) for _ in range(n)]
        hi = np.array([k[0] for k in keys], np.uint64)
        lo = np.array([k[1] for k in keys], np.uint64)
        out_hi, out_lo = _sorted_unique(hi, lo)
        assert list(zip(out_hi.tolist(), out_lo.tolist())) == sorted(set(keys))
    hi = np.array([rng.randrange(2**64) for _ in range(300)], np.uint64)   # distinct highs
    lo = np.array([rng.randrange(2**64) for _ in range(300)], np.uint64)
    out_hi, out_lo = _sorted_unique(hi, lo)
    assert list(zip(out_hi.tolist(), out_lo.tolist())) == sorted(zip(hi.tolist(), lo.tolist()))


def test_merge_packed_loads_stored_digests_as_the_ids_would_be_added(small_merges):
    """Packed digests in chunks (repeats within and across them, ids already sorted and still
    recent) give the same set as adding the ids; nothing is left in the recent set by them."""
    rng = random.Random(4)
    pool = _ids(rng, 500)
    done = DoneSet(pool[:100])                 # sorted
    done.update(pool[100:130])                 # recent
    batches = [rng.sample(pool[50:400], 60) for _ in range(8)] + [pool[380:400] * 2]
    chunks = [b"".join(digests(batch)) for batch in batches]
    loaded = set(pool[:130]).union(*batches)
    recent_before = set(done._recent)
    assert done.merge_packed(iter(chunks)) == sum(len(c) // 16 for c in chunks)
    assert done._recent == recent_before
    assert done.contains_many(pool) == [sid in loaded for sid in pool]
    assert len(done) == len(loaded)
    hi, lo = done._sorted
    keys = list(zip(hi.tolist(), lo.tolist()))
    assert keys == sorted(set(keys))
    assert done.merge_packed([]) == 0 and len(done) == len(loaded)


def test_merge_packed_keeps_keys_that_tie_on_the_high_half_in_order():
    done = DoneSet()
    assert done.merge_packed([_key(5, 8) + _key(5, 2), _key(1, 0) + _key(5, 2) + _key(9, 0)]) == 5
    done.merge_packed([_key(5, 4) + _key(5, 9) + _key(5, 8)])
    hi, lo = done._sorted
    assert list(zip(hi.tolist(), lo.tolist())) == [(1, 0), (5, 2), (5, 4), (5, 8), (5, 9), (9, 0)]
    assert done.contains_digests([_key(5, 4), _key(5, 5), _key(9, 0), _key(0, 0)]) == [
        True, False, True, False]


def test_merge_packed_refuses_digests_that_are_not_whole_keys():
    done = DoneSet(["a"])
    with pytest.raises(ValueError, match="packed digests of 31 bytes, expected a multiple of 16"):
        done.merge_packed([_key(1, 1), b"x" * 15])
    assert len(done) == 1 and "a" in done


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


def test_a_push_while_an_ack_joins_the_finished_set_is_a_duplicate(tmp_path):
    """An acked id joins the finished set outside the store's lock, before it leaves the
    entries: a push of it in that window (run here from inside the join) is a duplicate, on
    either side of the join, and is not queued again."""
    store = Store(tmp_path, compact_interval_s=3600)
    try:
        store.push([("a", 0, b"x"), ("b", 0, b"y")])
        seen = []
        join = store._done.update

        def update_with_pushes(ids):
            seen.append(store.push([("a", 0, b"again")]))
            join(ids)
            seen.append(store.push([("a", 0, b"again")]))

        store._done.update = update_with_pushes
        assert store.ack(["a"]) == (1, 0)
        assert seen == [(0, 1), (0, 1)]
        assert [sid for sid, _ in store.lease(10)] == ["b"]
        assert store.push([("a", 0, b"again")]) == (0, 1)
    finally:
        store.close()
