"""`clawjax.bench._cpu`: CPU seconds of a process tree over time, as `bench async` reads them.

The interpolation is checked on a hand-made trace; the /proc accounting on a real tree (a child
that spins while its own child spins too), against the CPU times the OS reports for it once
both are reaped (`resource.getrusage(RUSAGE_CHILDREN)`) — an accounting check, not a speed one."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import pytest

from clawjax.bench import _cpu

SPIN = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"
# A child that starts a spinning grandchild, spins itself, then waits for the grandchild.
PARENT = ("import subprocess, sys\n"
          "g = subprocess.Popen([sys.executable, '-c', {spin!r}])\n" + SPIN + "g.wait()\n")


def test_interpolation_and_window_on_a_hand_made_trace():
    trace = _cpu.CpuTrace(pid=0)
    trace.points = [(100.0, 1.0), (101.0, 2.0), (103.0, 2.5)]
    assert trace.cpu_at(100.5) == pytest.approx(1.5)
    assert trace.cpu_at(102.0) == pytest.approx(2.25)
    assert trace.cpu_between(100.5, 103.0) == pytest.approx(1.0)
    assert trace.cores_busy(100.0, 101.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside the sampled span"):
        trace.cpu_at(99.0)
    with pytest.raises(ValueError, match="expected t1 > t0"):
        trace.cores_busy(101.0, 101.0)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_a_spinning_tree_is_counted_with_its_grandchild():
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    code = PARENT.format(spin=SPIN.format(s=0.6), s=0.3)
    proc = subprocess.Popen([sys.executable, "-c", code])
    trace = _cpu.CpuTrace(proc.pid, interval_s=0.05).start()
    proc.wait()
    time.sleep(0.1)  # samples after the root is reaped: none is recorded (not a zero)
    trace.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    reported = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    # The last sample taken while the child lived holds both spins (the grandchild reaped by
    # then, so in the child's c-times); the OS's total also has the child's last moments.
    seen = max(c for _, c in trace.points)
    assert reported >= 0.9
    assert 0.8 * reported <= seen <= reported + 0.05
    assert trace.points[-1][1] == seen  # nothing recorded once the child was reaped
    assert _cpu.tree_cpu_seconds(proc.pid) is None


@pytest.mark.parametrize("proc_fs", [True, False])
def test_run_module_traces_cpu_only_where_the_os_exposes_it(tmp_path, monkeypatch, proc_fs):
    """`_runs.run_module(..., cpu_trace=[])` appends one trace of the run (Linux) or none (no
    /proc: bench async then prints "not measured" instead of a bound). The module run is one
    that does nothing when run: `clawjax.bench._cpu`."""
    from clawjax.bench import _runs
    if proc_fs and not _cpu.available():
        pytest.skip("needs Linux /proc")
    monkeypatch.setattr(_cpu, "available", lambda: proc_fs)
    traces: list = []
    wall = _runs.run_module("clawjax.bench._cpu", str(tmp_path), str(tmp_path / "run"), [],
                            timeout_s=120, cpu_trace=traces)
    assert wall > 0
    assert len(traces) == (1 if proc_fs else 0)
    if proc_fs:
        assert traces[0].points and all(c >= 0 for _, c in traces[0].points)


@pytest.mark.parametrize("platforms", ["cpu", None])
def test_run_module_sets_the_runs_jax_platforms(tmp_path, monkeypatch, platforms):
    """`platforms="cpu"` pins every process of the run to the CPU; None (bench async
    `--platforms default`) removes JAX_PLATFORMS, so JAX picks the GPU where there is one, and
    asks for on-demand GPU memory so that the run's processes can share the card."""
    from clawjax.bench import _runs
    (tmp_path / "envdump.py").write_text(
        "import json, os, sys\n"
        "workdir = sys.argv[1].split('=', 1)[1]\n"
        "keys = ('JAX_PLATFORMS', 'XLA_PYTHON_CLIENT_PREALLOCATE')\n"
        "json.dump({k: os.environ.get(k) for k in keys},"
        " open(os.path.join(workdir, 'env.json'), 'w'))\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")  # the caller's own setting never leaks through
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    _runs.run_module("envdump", str(tmp_path), str(tmp_path / "run"), [], timeout_s=60,
                     platforms=platforms)
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    if platforms is None:
        assert env == {"JAX_PLATFORMS": None, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    else:
        assert env == {"JAX_PLATFORMS": "cpu", "XLA_PYTHON_CLIENT_PREALLOCATE": None}
