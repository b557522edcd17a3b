"""Helpers shared by `bench methods` and `bench async`: whole-loop runs as subprocesses (each
with clean JAX state), one warm start shared by every run of a bench, steady-state rates from
metrics.jsonl."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from clawjax.bench import _cpu
from clawjax.local_stack import share_accelerator

# `--quick`: a tiny warm start and a short loop (smoke tests, not results).
QUICK_OVERRIDES = (
    "--config.warmstart.steps=20", "--config.warmstart.hidden_size=64",
    "--config.warmstart.intermediate_size=128", "--config.trainer.samples_per_step=8",
    "--config.eval.samples_per_task=1", "--config.eval.final_samples_per_task=2",
    "--config.eval.every_steps=2",
    "--config.publish.every_steps=2", "--config.checkpoint.every_steps=2",
    "--config.rollout.agents=4",
)


def share_warmstart(root: str, workdir: str) -> None:
    """Copies `root/warmstart` (if present) into `workdir/warmstart`: the run finds it cached
    when its fingerprint matches the run's settings, and trains its own otherwise."""
    src, dst = os.path.join(root, "warmstart"), os.path.join(workdir, "warmstart")
    if os.path.exists(os.path.join(src, "warmstart.json")) and not os.path.exists(dst):
        os.makedirs(workdir, exist_ok=True)
        shutil.copytree(src, dst)


def keep_warmstart(root: str, workdir: str) -> None:
    """After a run: its warm start becomes the shared one if there is none yet."""
    src, dst = os.path.join(workdir, "warmstart"), os.path.join(root, "warmstart")
    if os.path.exists(os.path.join(src, "warmstart.json")) and not os.path.exists(dst):
        shutil.copytree(src, dst)


def run_module(module: str, root: str, workdir: str, overrides: list[str],
               timeout_s: float | None = None, cpu_trace: list | None = None,
               platforms: str | None = "cpu") -> float:
    """Runs `python -m module --config.workdir=workdir *overrides` with the shared warm start;
    output goes to `workdir/run.log`, after a first line `$ <the command>`. Returns wall
    seconds; raises on a non-zero exit. With a `cpu_trace` list, the run's `_cpu.CpuTrace` (CPU
    seconds of its whole process tree over time) is appended to it where the OS exposes them
    (`_cpu.available()`). `platforms` is the run's JAX_PLATFORMS (every process of it: server,
    trainer, evaluator); None leaves JAX its own choice (a GPU where there is one; then each
    process allocates GPU memory on demand instead of taking 75% of it at start, so that the
    processes can share the card)."""
    share_warmstart(root, workdir)
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    if platforms is None:
        env.pop("JAX_PLATFORMS", None)
        share_accelerator(env)
    else:
        env["JAX_PLATFORMS"] = platforms
    cmd = [sys.executable, "-m", module, f"--config.workdir={workdir}",
           "--config.trainer.progress=False", *overrides]
    log_path = os.path.join(workdir, "run.log")
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")  # the run's command line, to reproduce it
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        trace = (_cpu.CpuTrace(proc.pid).start()
                 if cpu_trace is not None and _cpu.available() else None)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            if trace is not None:
                trace.stop()
                cpu_trace.append(trace)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}; {log_path}:\n{tail}")
    keep_warmstart(root, workdir)
    return time.monotonic() - start


def metrics_rows(workdir: str) -> tuple[list[dict], int]:
    """(`workdir/metrics.jsonl` rows, how many of the first are start-up): a quarter of the
    steps, at least one, left out of every steady-state figure."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows, max(1, len(rows) // 4)


def trained_rate(workdir: str) -> dict:
    """Steady-state samples trained per minute from `metrics.jsonl`: the first quarter of the
    steps (at least one) is left out of both samples and time — start-up, compilation, and the
    backlog the concurrent agents build up meanwhile (it would make the next steps look fast).
    Rate = samples of rows k+1.. / (time of the last row - time of row k), k = skipped steps.
    Returns {"samples", "seconds", "per_min", "steps" (timed), "skipped", "t0", "t1"} (t0, t1:
    the window's `time.time()` bounds), and the same window without the timed steps that met a
    new shape (`compiled` = 1: the step's time is mostly XLA compiling, a one-off per shape;
    their samples and their intervals left out): "compile_steps", "steady_seconds",
    "steady_per_min" (None when every timed step compiled)."""
    rows, skip = metrics_rows(workdir)
    if len(rows) < 2:
        raise ValueError(f"{workdir}/metrics.jsonl has {len(rows)} rows, expected >= 2")
    samples = sum(r["samples"] for r in rows[skip:])
    seconds = rows[-1]["time"] - rows[skip - 1]["time"]
    intervals = list(zip(rows[skip - 1:], rows[skip:]))  # (previous row, timed row)
    kept = [(a, b) for a, b in intervals if not b.get("compiled")]
    steady_seconds = sum(b["time"] - a["time"] for a, b in kept)
    steady_samples = sum(b["samples"] for _, b in kept)
    return {"samples": int(samples), "seconds": seconds, "per_min": 60.0 * samples / seconds,
            "steps": len(rows) - skip, "skipped": skip, "t0": rows[skip - 1]["time"],
            "t1": rows[-1]["time"], "compile_steps": len(intervals) - len(kept),
            "steady_seconds": steady_seconds,
            "steady_per_min": 60.0 * steady_samples / steady_seconds if kept else None}


def phase_seconds(workdir: str, steady: bool = False) -> dict:
    """Mean seconds per step of each phase of a `clawjax.sequential_run` (`metrics.jsonl` rows
    after the same skipped quarter as `trained_rate`): {"rollout", "train", "publish"}, where
    rollout = serve + judge (`rollout_s`), train = `step_time_s`, publish = the gated publish
    and the wait for the server's new version (`publish_wait_s`). `steady`: without the steps
    that compiled a new shape (as `trained_rate`'s steady figures)."""
    rows, skip = metrics_rows(workdir)
    rows = [r for r in rows[skip:] if not (steady and r.get("compiled"))]
    if not rows:
        raise ValueError(f"{workdir}/metrics.jsonl has too few rows for phase times")
    mean = lambda key: sum(float(r.get(key, 0.0)) for r in rows) / len(rows)
    return {"rollout": mean("rollout_s"), "train": mean("step_time_s"),
            "publish": mean("publish_wait_s")}
