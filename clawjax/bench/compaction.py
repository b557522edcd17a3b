"""`python -m clawjax.bench compaction`: does a WAL compaction cost more in a buffer that has
finished many samples before?

Two stores in temporary directories, fsync on. The baseline has finished nothing; the other first
finishes `--finished` samples (pushed, acked and compacted away). Then each, `--rounds` times,
pushes and acks `--new` samples, seals their segment, and times one compaction (`maybe_compact`).
Finished ids go to `done.log` once, when the compaction that drops their records runs, so the
ratio (medians, with history / without) should stay near 1 however long the buffer has run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

from clawjax.buffer.store import Store

SEGMENT_BYTES = 4 << 20


def _seal(store: Store, tag: str) -> None:
    """Fills the active segment past its size and starts the next one."""
    store.push([(f"seal-{tag}", 0, b"s" * SEGMENT_BYTES)])
    store.push([(f"seal-{tag}-next", 0, b"s")])
    store.ack([f"seal-{tag}"])


def finish_history(store: Store, n: int, batch: int = 20_000) -> None:
    """Pushes, acks and compacts away `n` small samples (ids shaped like session/turn ids)."""
    for start in range(0, n, batch):
        ids = [f"session-{i:09d}/turn-3" for i in range(start, min(start + batch, n))]
        store.push([(sid, 0, b"h" * 64) for sid in ids])
        store.ack(ids)
    _seal(store, "history")
    store.maybe_compact(force=True)


def time_compactions(store: Store, rounds: int, new: int, sample_bytes: int) -> list[float]:
    """Seconds of each of `rounds` compactions, each after `new` samples pushed and acked."""
    out = []
    for r in range(rounds):
        ids = [f"round{r}-{i}" for i in range(new)]
        store.push([(sid, 0, b"n" * sample_bytes) for sid in ids])
        store.ack(ids)
        _seal(store, f"round{r}")
        start = time.perf_counter()
        store.maybe_compact(force=True)
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m clawjax.bench compaction", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--finished", type=int, default=1_000_000,
                   help="samples finished before the timed compactions")
    p.add_argument("--new", type=int, default=2000, help="samples per timed compaction")
    p.add_argument("--sample-bytes", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    results = {}
    for name, history in (("baseline", 0), ("history", args.finished)):
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(tmp, segment_bytes=SEGMENT_BYTES, max_bytes=1 << 34,
                          compact_interval_s=3600)
            try:
                start = time.perf_counter()
                if history:
                    finish_history(store, history)
                setup = time.perf_counter() - start
                times = time_compactions(store, args.rounds, args.new, args.sample_bytes)
                stats = store.stats()
                done_bytes = store.done_log.disk_bytes()
            finally:
                store.close()
        results[name] = float(np.median(times))
        print(f"{name:8s} {history:>9,} finished ids before (set up in {setup:5.1f} s): "
              f"compaction of {args.new} new samples median {results[name] * 1e3:7.1f} ms "
              f"(rounds {', '.join(f'{t * 1e3:.1f}' for t in times)}); WAL "
              f"{stats['wal_bytes'] / 1e6:.1f} MB, done.log {done_bytes / 1e6:.1f} MB")
    ratio = results["history"] / results["baseline"]
    print(f"ratio with {args.finished:,} finished ids / without: {ratio:.2f}x "
          "(near 1: a compaction's cost follows the segments it reads, not the history)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
