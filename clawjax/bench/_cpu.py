"""CPU seconds used by a process tree over time (Linux `/proc`), for benches that compare whole
runs on a machine with few cores: how many cores a run keeps busy tells how much any overlap of
its loops could still gain.

A tree's CPU seconds at an instant = Σ over its live processes of (utime + stime + cutime +
cstime): a process's own time, plus that of its children that exited and were reaped (each CPU
second is counted once: a live process's time is its own, a reaped one's is in its parent's
c-times). Children that exit without being reaped by a process of the tree are missed (not the
case for the runs measured here: every child is waited for).
"""

from __future__ import annotations

import bisect
import os
import threading
import time

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of `/proc/pid/stat` after the command name (field 3, the state, is index 0);
    None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def available() -> bool:
    """Whether this OS exposes per-process CPU times in `/proc` (Linux)."""
    return os.path.isdir("/proc/self")


def tree_cpu_seconds(root: int) -> float | None:
    """CPU seconds (user + system) of `root` and all its live descendants, including the
    reaped children of each (see the module docstring); None once `root` is gone (reaped) or
    where /proc is unavailable. (An exited but unreaped root still counts: a zombie keeps its
    times, its reaped children's included.)"""
    parent_of: dict[int, int] = {}
    cpu_of: dict[int, float] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        parent_of[pid] = int(fields[1])              # field 4: ppid
        cpu_of[pid] = sum(int(x) for x in fields[11:15]) / _TICKS_PER_S  # fields 14-17
    if root not in cpu_of:
        return None
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_of.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu_of.get(pid, 0.0)
        todo.extend(children.get(pid, ()))
    return total


class CpuTrace:
    """Samples `tree_cpu_seconds(pid)` every `interval_s` in a thread, with wall-clock
    (`time.time()`) stamps, so CPU use can be read over any window of a run afterwards.

        trace = CpuTrace(proc.pid); trace.start(); ...; trace.stop()
        trace.cores_busy(t0, t1)   # mean cores busy between two time.time() stamps
    """

    def __init__(self, pid: int, interval_s: float = 0.5):
        self.pid, self.interval_s = pid, interval_s
        self.points: list[tuple[float, float]] = []   # (time.time(), tree CPU seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-trace", daemon=True)

    def start(self) -> "CpuTrace":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            now, cpu = time.time(), tree_cpu_seconds(self.pid)
            if cpu is not None:  # a reaped root reads as nothing, not as zero CPU
                self.points.append((now, cpu))
            if self._stop.wait(self.interval_s):
                return

    def cpu_at(self, t: float) -> float:
        """Tree CPU seconds at wall time `t`, linearly interpolated between samples; raises
        ValueError if `t` is outside the sampled span."""
        times = [p[0] for p in self.points]
        if len(times) < 2 or not times[0] <= t <= times[-1]:
            span = f"{times[0]:.1f}..{times[-1]:.1f}" if times else "nothing"
            raise ValueError(f"time {t:.1f} outside the sampled span ({span})")
        i = max(1, bisect.bisect_left(times, t))
        (t0, c0), (t1, c1) = self.points[i - 1], self.points[i]
        return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)

    def cpu_between(self, t0: float, t1: float) -> float:
        """CPU seconds the tree used between wall times `t0` < `t1`."""
        return self.cpu_at(t1) - self.cpu_at(t0)

    def cores_busy(self, t0: float, t1: float) -> float:
        """Mean number of cores the tree kept busy between `t0` and `t1`."""
        if not t1 > t0:
            raise ValueError(f"window {t0:.3f}..{t1:.3f}: expected t1 > t0")
        return self.cpu_between(t0, t1) / (t1 - t0)


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
