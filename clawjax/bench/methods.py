"""`python -m clawjax.bench methods`: Binary RL, hindsight OPD and their combination on the
default task — N seeds each, the same step budget, one shared warm start — held-out judged score
before (the warm-started policy) and after, in one table and one plot (`bench_methods.png`).

Each run is `python -m clawjax.train --config.method=M --config.trainer.seed=S` in its own
workdir `ROOT/M-sS` (a clean process: no JAX state shared between runs). The first run trains
the warm start; it is copied into every other run's workdir, where its fingerprint makes it
cached; so is every program any run compiled (one XLA cache, `ROOT/xla_cache`, for all: the
bench compares scores, not times). Before/after are the first and last entries of the run's `eval.jsonl` (the held-out
evaluation of the served warm start, and of the final policy after its last publish). A run whose
`summary.json` exists is read, not rerun (an interrupted bench resumes).

    python -m clawjax.bench methods [--seeds 3] [--steps 30] [--workdir bench/methods] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

from clawjax import compile_cache
from clawjax.bench import _runs
from clawjax.bench.common import print_table
from clawjax.config import METHODS


def run_one(root: str, method: str, seed: int, steps: int, quick: bool) -> dict:
    """One whole-loop run (or its existing summary); returns {method, seed, before, after}."""
    workdir = os.path.join(root, f"{method}-s{seed}")
    summary_path = os.path.join(workdir, "summary.json")
    if not os.path.exists(summary_path):
        if os.path.exists(workdir):
            raise FileExistsError(f"{workdir} holds an unfinished run; remove it to rerun")
        _runs.run_module("clawjax.train", root, workdir, [
            *(_runs.QUICK_OVERRIDES if quick else ()), f"--config.method={method}",
            f"--config.compile_cache_dir={os.path.join(root, compile_cache.SUBDIR)}",
            f"--config.trainer.seed={seed}", f"--config.trainer.steps={steps}"])
    with open(summary_path) as f:
        summary = json.load(f)
    return {"method": method, "seed": seed, "before": float(summary["heldout_before"]),
            "after": float(summary["heldout_after"]), "steps": int(summary["steps"])}


def per_method(results: list[dict]) -> dict[str, dict]:
    """{method: {"mean", "std" (sample std, 0 for one seed), "n", "delta_mean"}} of after-scores."""
    out = {}
    for m in METHODS:
        after = [r["after"] for r in results if r["method"] == m]
        delta = [r["after"] - r["before"] for r in results if r["method"] == m]
        if after:
            out[m] = {"mean": statistics.fmean(after), "n": len(after),
                      "std": statistics.stdev(after) if len(after) > 1 else 0.0,
                      "delta_mean": statistics.fmean(delta)}
    return out


def plot(results: list[dict], stats: dict[str, dict], path: str) -> str:
    """After-score per method (bar: mean, dots: seeds), the warm start's mean as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = [m for m in METHODS if m in stats]
    for i, m in enumerate(methods):
        ax.bar(i, stats[m]["mean"], yerr=stats[m]["std"], color="lightsteelblue", capsize=4)
        dots = [r["after"] for r in results if r["method"] == m]
        ax.plot([i] * len(dots), dots, "o", color="black")
    before = statistics.fmean(r["before"] for r in results)
    ax.axhline(before, linestyle="--", color="gray", label=f"warm start ({before:.3f})")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("held-out score after (share judged +1)")
    ax.set_ylim(0.0, 1.0)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(results: list[dict], stats: dict[str, dict]) -> str:
    """The printed verdict: whether combine's mean after-score >= max(rl, opd)."""
    if not all(m in stats for m in METHODS):
        return "combine >= max(rl, opd): undecided (not every method ran)"
    best_other = max(stats["rl"]["mean"], stats["opd"]["mean"])
    holds = stats["combine"]["mean"] >= best_other
    return (f"combine >= max(rl, opd): {'yes' if holds else 'no'} "
            f"(combine {stats['combine']['mean']:.3f} vs max {best_other:.3f}, mean after-score)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m clawjax.bench methods", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run (default 30; --quick: 2)")
    parser.add_argument("--workdir", default="bench/methods",
                        help="bench root: one workdir per run, the shared `warmstart/`")
    parser.add_argument("--quick", action="store_true",
                        help="tiny: 1 seed, 2 steps, small warm start")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (2 if args.quick else 30)
    if seeds < 1:
        parser.error(f"--seeds {seeds}: expected >= 1")
    if steps < 1:
        parser.error(f"--steps {steps}: expected >= 1")
    root = os.path.abspath(args.workdir)
    os.makedirs(root, exist_ok=True)
    results = []
    for seed in range(seeds):  # seed-major: an interrupted bench has every method alike
        for method in METHODS:
            results.append(run_one(root, method, seed, steps, args.quick))
            print(f"{method} seed {seed}: before {results[-1]['before']:.3f} "
                  f"after {results[-1]['after']:.3f}", flush=True)
    stats = per_method(results)
    print(f"\nbench methods: {seeds} seed(s) x {steps} steps per method, one warm start")
    rows = [[r["method"], r["seed"], f"{r['before']:.3f}", f"{r['after']:.3f}",
             f"{r['after'] - r['before']:+.3f}"] for r in results]
    rows += [[m, "mean ± std", "", f"{s['mean']:.3f} ± {s['std']:.3f}", f"{s['delta_mean']:+.3f}"]
             for m, s in stats.items()]
    print_table(["method", "seed", "before", "after", "Δ"], rows)
    print(report(results, stats))
    path = plot(results, stats, os.path.join(root, "bench_methods.png"))
    print(f"plot: {path}")
    with open(os.path.join(root, "bench_methods.json"), "w") as f:
        json.dump({"results": results, "per_method": stats}, f, indent=1)
    if any(not math.isfinite(r["after"]) for r in results):
        return 1
    return 0
