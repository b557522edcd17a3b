"""`DoneSet`: the ids a buffer has finished for good, held as 128-bit digests in sorted arrays.

A buffer must ignore a repeated push of any id it ever finished, for as long as it runs, so this
set only grows. A Python `set[str]` of session/turn ids costs about 107 bytes per id (the str
and its slot); a `DoneSet` costs 16 bytes per id in its sorted arrays plus a small set of
recent digests, which `consolidate` merges in (`python -m clawjax.bench doneset` measures both).
A restart loads the digests done.log stores with `merge_packed`, without hashing an id.

Layout:
  `_recent`  set of 16-byte blake2b digests added since the last consolidation
  `_sorted`  (hi, lo): two `[N]` uint64 arrays, the digests' two little-endian halves, sorted
             by (hi, lo), no repeats; replaced as a whole (one tuple), never changed in place

Membership is by digest: two different ids collide with probability 2^-128 per pair (for 10^12
ids, about 10^-15 in all), so a digest match is taken as the same id. The digest is part of
done.log's format (`DoneIds.digests`): blake2b with a 16-byte digest over the id's UTF-8 bytes
(lone surrogates passed through); changing it would make stored digests miss.

Thread safety: `add`/`update` and `consolidate` may run in different threads; `consolidate`
serializes with itself. Readers take no lock: a consolidation publishes the new arrays before
it drops their digests from `_recent`, so a reader that checks `_recent` first and the arrays
second never misses an id that was added before its call.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from typing import Iterable

import numpy as np

_EMPTY = (np.zeros(0, np.uint64), np.zeros(0, np.uint64))
_DIGEST_OBJECT_BYTES = sys.getsizeof(bytes(16))   # one recent digest (a bytes object)

# `consolidate` merges when the recent digests reach max(MIN_RECENT, len(sorted) // GROWTH):
# each merge copies the arrays once, so merges cost O(1) amortized per id, and the recent set
# adds at most about 1/GROWTH of the arrays' ids (at ~90 bytes each) on top of 16 bytes per id.
MIN_RECENT = 50_000
GROWTH = 16


def digests(ids: Iterable[str]) -> list[bytes]:
    """The 16-byte blake2b digest of each id's UTF-8 bytes (one list comprehension: a restart
    digests every finished id once)."""
    blake2b = hashlib.blake2b
    return [blake2b(sid.encode("utf-8", "surrogatepass"), digest_size=16).digest() for sid in ids]


def digest(sample_id: str) -> bytes:
    """`digests` of one id."""
    return digests((sample_id,))[0]


def _split(packed: bytes) -> tuple[np.ndarray, np.ndarray]:
    """M packed 16-byte digests → (hi, lo) `[M]` uint64 arrays (views of one buffer), in order."""
    if len(packed) % 16:
        raise ValueError(f"packed digests of {len(packed)} bytes, expected a multiple of 16")
    halves = np.frombuffer(packed, dtype="<u8")
    return halves[0::2], halves[1::2]


def _halves(keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """[M] digests → (hi, lo) `[M]` uint64 arrays (views of one buffer), in the same order."""
    return _split(b"".join(keys))


def _sorted_unique(hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) `[M]` → the distinct keys sorted by (hi, lo), as new arrays. One argsort of `hi`;
    a lexsort of both halves only when two keys share a `hi` (for M random digests, with
    probability about M^2 / 2^65), so the common case sorts one array, not two."""
    order = np.argsort(hi)
    hi, lo = hi[order], lo[order]
    same_hi = hi[1:] == hi[:-1]
    if same_hi.any():
        order = np.lexsort((lo, hi))
        hi, lo = hi[order], lo[order]
        same_hi = hi[1:] == hi[:-1]
    repeat = same_hi & (lo[1:] == lo[:-1])
    if repeat.any():
        keep = np.concatenate(([True], ~repeat))
        hi, lo = hi[keep], lo[keep]
    return hi, lo


def _positions(hi: np.ndarray, lo: np.ndarray, qhi: np.ndarray, qlo: np.ndarray) -> np.ndarray:
    """For each query (qhi, qlo): the first index i of the (hi, lo)-sorted arrays with
    (hi[i], lo[i]) >= the query (len(hi) when none). Ties on hi (rare) are stepped through."""
    pos = np.searchsorted(hi, qhi, side="left")
    step = np.ones(pos.shape[0], bool)
    while True:
        step &= pos < hi.shape[0]
        step[step] &= (hi[pos[step]] == qhi[step]) & (lo[pos[step]] < qlo[step])
        if not step.any():
            return pos
        pos[step] += 1


def _found_at(hi: np.ndarray, lo: np.ndarray, pos: np.ndarray, qhi: np.ndarray,
              qlo: np.ndarray) -> np.ndarray:
    """`[M]` bool: the key at `pos` of the non-empty sorted arrays is the query (False where
    `pos` is len(hi): that key would be past the end)."""
    at = np.minimum(pos, hi.shape[0] - 1)
    return (pos < hi.shape[0]) & (hi[at] == qhi) & (lo[at] == qlo)


def _matches(hi: np.ndarray, lo: np.ndarray, qhi: np.ndarray, qlo: np.ndarray) -> np.ndarray:
    """`[M]` bool: query m is a key of the non-empty (hi, lo)-sorted arrays. The common case
    (no key shares a query's hi with a smaller lo) takes one search and no stepping."""
    pos = np.searchsorted(hi, qhi, side="left")
    at = np.minimum(pos, hi.shape[0] - 1)
    if ((hi[at] == qhi) & (lo[at] < qlo)).any():
        pos = _positions(hi, lo, qhi, qlo)
    return _found_at(hi, lo, pos, qhi, qlo)


class DoneSet:
    """A grow-only set of sample ids: `in`, `contains_many`, `add`, `update`, `len`."""

    def __init__(self, ids: Iterable[str] = ()):
        self._recent: set[bytes] = set()
        self._sorted: tuple[np.ndarray, np.ndarray] = _EMPTY
        self._merge_lock = threading.Lock()
        self.update(ids)
        self.consolidate(force=True)

    def add(self, sample_id: str) -> None:
        self._recent.update(digests((sample_id,)))

    def update(self, ids: Iterable[str]) -> None:
        self._recent.update(digests(ids))

    def __contains__(self, sample_id: object) -> bool:
        if not isinstance(sample_id, str):
            return False
        return self.contains_many([sample_id])[0]

    def contains_many(self, ids: list[str]) -> list[bool]:
        """Membership of each id, in order (one vectorized search of the sorted arrays)."""
        return self.contains_digests(digests(ids))

    def contains_digests(self, queries: list[bytes]) -> list[bool]:
        """`contains_many` of ids already digested (`digests(ids)`): a caller can hash outside
        its own lock and search inside it."""
        if not queries:
            return []
        recent = self._recent          # read before the arrays (see the module docstring)
        found = [d in recent for d in queries]
        hi, lo = self._sorted
        if hi.shape[0] and not all(found):
            hit = _matches(hi, lo, *_halves(queries)).tolist()
            found = [a or b for a, b in zip(found, hit)]
        return found

    def __len__(self) -> int:
        """Distinct ids (a digest both recent and sorted, mid-consolidation, counts once)."""
        recent = list(self._recent)
        hi, lo = self._sorted
        if not recent or not hi.shape[0]:
            return len(recent) + hi.shape[0]
        return hi.shape[0] + int((~_matches(hi, lo, *_halves(recent))).sum())

    @property
    def nbytes(self) -> int:
        """Bytes held: the sorted arrays plus the recent digests and their set's table."""
        hi, lo = self._sorted
        recent = self._recent
        return hi.nbytes + lo.nbytes + sys.getsizeof(recent) + len(recent) * _DIGEST_OBJECT_BYTES

    def consolidate(self, force: bool = False) -> int:
        """Merges the recent digests into the sorted arrays when there are enough of them
        (max(`MIN_RECENT`, len(sorted) // `GROWTH`)) or `force`; returns how many it merged.
        O(N + M log M) for N sorted and M recent; runs outside any caller's lock."""
        with self._merge_lock:
            hi, lo = self._sorted
            if not self._recent or (not force and
                                    len(self._recent) < max(MIN_RECENT, hi.shape[0] // GROWTH)):
                return 0
            frozen = list(self._recent)   # one C call under the GIL: a consistent snapshot
            self._merge(*_halves(frozen))
            self._recent.difference_update(frozen)
            return len(frozen)

    def merge_packed(self, chunks: Iterable[bytes]) -> int:
        """Merges packed 16-byte digests (done.log's `DoneIds.digests`, any number of chunks)
        straight into the sorted arrays: one sort of them all and one merge, no per-id Python
        objects (a restart's bulk load). Returns how many digests it read (repeats included).
        Raises ValueError for a chunk whose length is not a multiple of 16."""
        packed = b"".join(chunks)
        qhi, qlo = _split(packed)
        if qhi.shape[0]:
            with self._merge_lock:
                self._merge(qhi, qlo)
        return qhi.shape[0]

    def _merge(self, qhi: np.ndarray, qlo: np.ndarray) -> None:
        """Publishes the sorted arrays with keys (qhi, qlo) `[M]` added (any order, repeats
        allowed). O(N + M log M) for N sorted keys. Caller holds `_merge_lock`."""
        qhi, qlo = _sorted_unique(qhi, qlo)
        hi, lo = self._sorted
        pos = _positions(hi, lo, qhi, qlo)
        if hi.shape[0]:   # keys already sorted are dropped
            new = ~_found_at(hi, lo, pos, qhi, qlo)
            pos, qhi, qlo = pos[new], qhi[new], qlo[new]
        self._sorted = (np.insert(hi, pos, qhi), np.insert(lo, pos, qlo))
