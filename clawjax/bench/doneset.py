"""`python -m clawjax.bench doneset`: memory and speed of the buffer's finished-id set
(`clawjax.buffer.done_set.DoneSet`) against a Python `set[str]` of the same ids, in one process.

The buffer keeps every id it ever finished, for as long as it runs, to ignore repeated pushes.
Printed: bytes per id (traced allocations of the set and of its ids; the ids are the set's own
strings, as in the store, where nothing else holds a finished id), the time to check one push's
`--batch` new ids (the store's hot path, under its lock), the time to build each from `--ids`
ids, one consolidation (a merge of `len // GROWTH` recent ids, off the lock), and a restart's
load of `--ids` finished ids from done.log: the stored digests merged in bulk (as the store
does) vs the same file's ids hashed (records written before digests were stored) vs a Python
set of its ids.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import tracemalloc

import numpy as np

from clawjax.buffer import done_set
from clawjax.buffer.compaction import DoneLog, done_records
from clawjax.buffer.done_set import DoneSet


def session_ids(start: int, stop: int):
    """Ids shaped like the proxy's (`session/turn`): 24 characters."""
    return (f"session-{i:09d}/turn-3" for i in range(start, stop))


def traced_build(build, n: int):
    """(object, bytes it holds, seconds to build) for `build(ids)` over `n` fresh ids."""
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    obj = build(session_ids(0, n))
    seconds = time.perf_counter() - start
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return obj, held, seconds


def per_call_us(fn, calls: int) -> float:
    """Median over 5 repeats of the mean µs per call of `fn(i)` for i in range(calls)."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(calls):
            fn(i)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return float(np.median(times))


def restart_loads(n: int) -> dict[str, float]:
    """Seconds to load n finished ids from a done.log (opened afresh, as a restart does), best
    of 3: `stored` the store's way (the stored digests, `merge_packed`), `hashed` the same from
    a done.log of plain id records (each id hashed), `set` a Python set of the ids."""
    ids = list(session_ids(0, n))
    with tempfile.TemporaryDirectory() as stored_dir, tempfile.TemporaryDirectory() as ids_dir:
        DoneLog(stored_dir, fsync=False).append(ids)
        DoneLog(ids_dir, fsync=False).append_records(done_records(ids))   # no digests
        del ids
        loads = {"stored": lambda: DoneSet().merge_packed(DoneLog(stored_dir).key_chunks()),
                 "hashed": lambda: DoneSet().merge_packed(DoneLog(ids_dir).key_chunks()),
                 "set": lambda: len(set(DoneLog(stored_dir).ids()))}
        best = {}
        for _ in range(3):
            for name, load in loads.items():
                gc.collect()
                start = time.perf_counter()
                assert load() == n
                seconds = time.perf_counter() - start
                best[name] = min(best.get(name, seconds), seconds)
        return best


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m clawjax.bench doneset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", type=int, default=1_000_000, help="finished ids held")
    p.add_argument("--batch", type=int, default=16, help="ids per push checked")
    p.add_argument("--calls", type=int, default=2000, help="pushes checked per timing")
    args = p.parse_args(argv)
    n = args.ids

    plain, plain_bytes, plain_build = traced_build(set, n)
    compact, compact_bytes, compact_build = traced_build(DoneSet, n)
    assert len(compact) == len(plain) == n

    # One push's ids: new ones (the common case), half of them already finished (retries).
    fresh = [list(session_ids(n + i * args.batch, n + (i + 1) * args.batch))
             for i in range(args.calls)]
    retry = [f[: args.batch // 2] + list(session_ids(i, i + args.batch - args.batch // 2))
             for i, f in enumerate(fresh)]
    for batch in retry[:50]:
        assert compact.contains_many(batch) == [sid in plain for sid in batch]
    plain_us = per_call_us(lambda i: [sid in plain for sid in fresh[i]], args.calls)
    compact_us = per_call_us(lambda i: compact.contains_many(fresh[i]), args.calls)
    compact_retry_us = per_call_us(lambda i: compact.contains_many(retry[i]), args.calls)

    compact.update(session_ids(2 * n, 2 * n + max(done_set.MIN_RECENT, n // done_set.GROWTH)))
    start = time.perf_counter()
    merged = compact.consolidate()
    merge_s = time.perf_counter() - start
    compact_nbytes = compact.nbytes
    plain = compact = None      # freed: the restart loads below build their own
    restart = restart_loads(n)

    print(f"{n:,} finished ids, {args.batch} ids per push")
    print(f"python set[str]  {plain_bytes / n:6.1f} bytes/id ({plain_bytes / 1e6:7.1f} MB), "
          f"built in {plain_build:5.2f} s, check of one push {plain_us:6.1f} us")
    print(f"DoneSet          {compact_bytes / n:6.1f} bytes/id ({compact_bytes / 1e6:7.1f} MB; "
          f"nbytes {compact_nbytes / 1e6:.1f} MB after the merge below), built in "
          f"{compact_build:5.2f} s, check of one push {compact_us:6.1f} us "
          f"({compact_retry_us:.1f} us with half of them finished)")
    print(f"one consolidation of {merged:,} recent ids into {n:,}: {merge_s * 1e3:.1f} ms "
          "(in the compactor thread, outside the store's lock)")
    print(f"restart, {n:,} finished ids from done.log: stored digests {restart['stored']:.3f} s, "
          f"ids hashed {restart['hashed']:.3f} s, python set of the ids {restart['set']:.3f} s")
    print(f"ratio memory DoneSet / set: {compact_bytes / plain_bytes:.2f}x; "
          f"ratio push check time DoneSet / set: {compact_us / plain_us:.2f}x; "
          "ratio restart stored digests / ids hashed: "
          f"{restart['stored'] / restart['hashed']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
