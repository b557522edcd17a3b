"""Shared helpers for `python -m clawjax.bench NAME`: compile with memory figures, time with
warmup and median, print aligned tables. Generic on purpose; benchmarks import what they need."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Sequence

import jax


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes from a compiled executable's `memory_analysis()`.

    peak: arguments + outputs + temporaries − aliased bytes, an upper bound on what is live at
    once (the CPU backend's own `peak_memory_in_bytes` leaves temporaries out, so it is not
    used); temp: scratch buffers alone, i.e. the working memory the computation needs beyond
    its inputs and outputs."""

    peak: int
    temp: int
    argument: int
    output: int


def compile_with_memory(fn: Callable, *args: Any, **jit_kwargs: Any) -> tuple[Callable, Memory]:
    """jit + lower + compile `fn` for `args`; returns (compiled executable, Memory)."""
    compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
    m = compiled.memory_analysis()
    temp, arg, out = (int(getattr(m, name, 0) or 0) for name in
                      ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"))
    alias = int(getattr(m, "alias_size_in_bytes", 0) or 0)
    peak = temp + arg + out - alias
    return compiled, Memory(peak=peak, temp=temp, argument=arg, output=out)


def time_call(fn: Callable, *args: Any) -> float:
    """Seconds for one call, waiting for every output array."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def time_interleaved(fns: dict[str, Callable], args: dict[str, Sequence[Any]],
                     warmup: int = 1, repeats: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, alternating between them round by round so
    load changes on a shared machine hit all of them alike. `args[name]` are fn's arguments."""
    for _ in range(warmup):
        for name, fn in fns.items():
            time_call(fn, *args[name])
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn, *args[name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Prints a left-aligned text table (cells converted with str)."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
