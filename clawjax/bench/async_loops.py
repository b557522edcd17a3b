"""`python -m clawjax.bench async`: samples trained per minute with the four loops concurrent
(the default run, `python -m clawjax.train`) vs the same components in strict sequence
(`python -m clawjax.sequential_run`: serve → judge → train → publish, nothing overlapping).

Both runs: the same config and overrides, the same step budget, one shared warm start, each its
own compilation cache starting empty (`<workdir>/xla_cache`), on this machine one after the
other; `--repeats` pairs of them (the modes alternating in time), and the reported ratio is the
median of the pairs' ratios (single runs vary by ±20% here). The rate is read the same way from
each run's `metrics.jsonl` (`_runs.trained_rate`: the first quarter of the steps — start-up,
compilation and the backlog built meanwhile — is left out). A step that meets a new batch shape
later (more rows, a larger score capacity) compiles again, seconds in a window of a few: a second
"steady" ratio and overlap bound leave the steps flagged `compiled` out of both runs (their samples
and their time), the rate a long-running loop settles at. Periodic held-out evaluation is pushed
out of both runs (`eval.every_steps` huge; it is not one of the four loops), except that the
default run's evaluator still scores the first published version once (the warm start's version is
not a number, so any new version is due): that evaluation counts against the concurrent rate.

Two bounds on what overlapping the loops can gain, both read from the sequential run:
- overlap: (sum of its phase times: rollout, train, publish) / (the longest phase), reached
  only with a core per loop;
- CPU: (usable cores) / (cores the sequential run keeps busy in the timed window, its whole
  process tree counted). Running the same CPU work per sample on every core can do no better;
  when the sequential run already keeps most cores busy, concurrency has little idle CPU to
  fill (each mode's cores busy and CPU ms per trained sample are printed).

    python -m clawjax.bench async [--steps 60] [--repeats 3] [--workdir bench/async] [--quick]
                                  [--platforms cpu|default|cuda|...] [--server-platforms P]
                                  [--config.KEY=VALUE ...]

`--platforms` (JAX_PLATFORMS of every process; default cpu): `default` leaves JAX its choice, so
on a GPU host the server, trainer and evaluator processes share the GPU (each allocating on
demand) and only the agents, proxy, judge and buffer stay on the CPU. `--server-platforms` gives
the policy server its own (`rollout.server_platforms`): `--platforms cpu --server-platforms cuda`
serves on the GPU and trains on the CPU, serving and training on separate devices as a fleet and
a trainer are, with no two processes taking turns on one GPU.

`--config.KEY=VALUE` overrides of `configs/default.py` go to both runs of every pair alike (after
the bench's own), e.g. `--config.rollout.agents=16`: more simulated users, so that a GPU server
decodes more sequences per step (its `rollout.max_batch` slots) and the rollout phase is a smaller
share of a sequential step. `--steps` sets `trainer.steps`, `--workdir` each run's workdir, and
periodic evaluation stays off: those keys are refused here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics

from clawjax.bench import _cpu, _runs
from clawjax.bench.common import print_table
from clawjax.configs import default as default_config

NO_PERIODIC_EVAL = "--config.eval.every_steps=1000000"
RESERVED_KEYS = ("workdir", "trainer.steps", "eval.every_steps", "trainer.progress")


def config_overrides(args: list[str]) -> list[str]:
    """Validates `--config.KEY=VALUE` arguments against `configs/default.py` (both runs' config):
    returns them unchanged; raises ValueError naming the argument for anything else, an unknown
    key, or a key the bench sets itself (`RESERVED_KEYS`). The value is parsed by the runs."""
    config = default_config.get_config()
    for arg in args:
        match = re.fullmatch(r"--config\.([A-Za-z0-9_.]+)=(.*)", arg, re.S)
        if match is None:
            raise ValueError(f"argument {arg!r}: expected --config.KEY=VALUE (an override of "
                             "configs/default.py for both runs) or one of the options above")
        key = match.group(1)
        if key in RESERVED_KEYS:
            raise ValueError(f"argument {arg!r}: config key {key!r} is set by the bench itself "
                             "(--workdir, --steps; periodic evaluation stays off)")
        node = config
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node.keys():
                raise ValueError(f"argument {arg!r}: config key {key!r} is not in "
                                 "configs/default.py")
            node = node[part]
    return list(args)


def measure_pair(root: str, tag: str, overrides: list[str], platforms: str | None = "cpu") -> dict:
    """One concurrent run then one sequential run, in `root/concurrent{tag}` and
    `root/sequential{tag}`: {mode: trained_rate dict + "wall_s", "cores_busy", "cpu_ms_per_sample"
    (over the timed window)}, their ratio, the sequential run's phase times and the two bounds
    (module docstring). `platforms`: `_runs.run_module`'s (JAX_PLATFORMS of both runs)."""
    out: dict = {}
    for mode, module in (("concurrent", "clawjax.train"), ("sequential", "clawjax.sequential_run")):
        workdir = os.path.join(root, mode + tag)
        if os.path.exists(workdir):
            raise FileExistsError(f"--workdir: {workdir} exists, expected a fresh bench root "
                                  "(a resumed run would mix two runs' metrics)")
        traces: list = []
        wall = _runs.run_module(module, root, workdir, overrides, cpu_trace=traces,
                                platforms=platforms)
        rate = _runs.trained_rate(workdir)
        out[mode] = dict(rate, wall_s=wall, cores_busy=None, cpu_ms_per_sample=None)
        if traces:  # CPU times are read from /proc: Linux only
            busy = traces[0].cores_busy(rate["t0"], rate["t1"])  # the window is rate["seconds"]
            out[mode].update(cores_busy=busy,
                             cpu_ms_per_sample=1e3 * busy * rate["seconds"] / rate["samples"])
    out["ratio"] = out["concurrent"]["per_min"] / out["sequential"]["per_min"]
    steady = out["concurrent"]["steady_per_min"], out["sequential"]["steady_per_min"]
    out["steady_ratio"] = steady[0] / steady[1] if None not in steady else None
    for key, steady_only in (("", False), ("steady_", True)):
        phases = _runs.phase_seconds(os.path.join(root, "sequential" + tag), steady_only)
        out[key + "sequential_phases_s"] = phases
        # Perfect overlap would make a step as long as its longest phase (on unlimited cores).
        out[key + "overlap_bound"] = sum(phases.values()) / max(phases.values())
    out["cores"] = _cpu.usable_cores()
    busy = out["sequential"]["cores_busy"]
    out["cpu_bound"] = out["cores"] / max(busy, 1e-9) if busy is not None else None
    return out


def measure(root: str, steps: int, quick: bool, repeats: int = 1,
            platforms: str | None = "cpu", server_platforms: str = "",
            extra_overrides: tuple[str, ...] = ()) -> dict:
    """`repeats` pairs of runs under `root` (pair i in `concurrent-i` / `sequential-i`), the
    modes alternating in time so that load changes on a shared machine hit both; returns
    {"pairs": [measure_pair result, ...], "ratio": the median ratio, and the median
    "overlap_bound" and "cpu_bound" (None where CPU times are not measured)}.
    `server_platforms`: `rollout.server_platforms` of both runs ("" = `platforms`).
    `extra_overrides`: `--config.KEY=VALUE` for both runs, after the bench's own (they win)."""
    quick_overrides = [o for o in (_runs.QUICK_OVERRIDES if quick else ())
                       if not o.startswith("--config.eval.every_steps=")]
    overrides = [*quick_overrides, NO_PERIODIC_EVAL, f"--config.trainer.steps={steps}",
                 *([f"--config.rollout.server_platforms={server_platforms}"]
                   if server_platforms else []), *extra_overrides]
    pairs = [measure_pair(root, f"-{i + 1}", overrides, platforms) for i in range(repeats)]
    return {"platforms": platforms or "default",
            "server_platforms": server_platforms or platforms or "default",
            "overrides": overrides, **summarize(pairs)}


def summarize(pairs: list[dict]) -> dict:
    """{"pairs": `pairs`, and over them the median "ratio", "overlap_bound",
    "steady_overlap_bound", "steady_ratio" and "cpu_bound" (the last two None when any pair's
    is None)}. `pairs`: `measure_pair` results, at least one."""
    return {"pairs": pairs,
            "ratio": statistics.median(p["ratio"] for p in pairs),
            "overlap_bound": statistics.median(p["overlap_bound"] for p in pairs),
            "steady_ratio": _median_or_none(p["steady_ratio"] for p in pairs),
            "steady_overlap_bound": statistics.median(p["steady_overlap_bound"] for p in pairs),
            "cpu_bound": _median_or_none(p["cpu_bound"] for p in pairs)}


def _median_or_none(values):
    values = list(values)
    return None if None in values else statistics.median(values)


def _median_phases(pairs: list[dict], key: str) -> dict:
    """{phase: the median over pairs of `pair[key][phase]`} (`key`: a phase-times entry)."""
    return {name: statistics.median(p[key][name] for p in pairs) for name in pairs[0][key]}


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m clawjax.bench async", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run (default 60; --quick: 4)")
    parser.add_argument("--workdir", default="bench/async",
                        help="bench root; a shared `warmstart/` in it is reused")
    parser.add_argument("--quick", action="store_true", help="tiny warm start and loop")
    parser.add_argument("--repeats", type=int, default=None,
                        help="pairs of runs; the ratio is their median (default 3; --quick: 1)")
    parser.add_argument("--platforms", default="cpu",
                        help="JAX_PLATFORMS of every process of both runs (default cpu; "
                             "'default' leaves JAX its choice: a GPU where there is one, shared "
                             "by the server, trainer and evaluator processes)")
    parser.add_argument("--server-platforms", default="",
                        help="JAX_PLATFORMS of the policy server alone (rollout.server_platforms; "
                             "default: --platforms'), e.g. cuda with --platforms cpu: serving and "
                             "training on separate devices")
    args, extra = parser.parse_known_args(argv)
    try:
        extra = config_overrides(extra)
    except ValueError as e:
        parser.error(str(e))
    steps = args.steps if args.steps is not None else (4 if args.quick else 60)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if steps < 2:
        parser.error(f"--steps {steps}: expected >= 2 (the first step is never timed)")
    if repeats < 1:
        parser.error(f"--repeats {repeats}: expected >= 1")
    root = os.path.abspath(args.workdir)
    platforms = None if args.platforms == "default" else args.platforms
    result = measure(root, steps, args.quick, repeats, platforms, args.server_platforms,
                     tuple(extra))
    pairs = result["pairs"]
    print(f"\nbench async: {steps} steps per run, {repeats} pair(s) of runs, same config, "
          f"same machine, JAX platforms: {args.platforms}, policy server's: "
          f"{args.server_platforms or args.platforms}"
          + (f", overrides: {' '.join(extra)}" if extra else ""))
    print(f"(rates over the last {pairs[0]['concurrent']['steps']} steps of each run: the first "
          f"{pairs[0]['concurrent']['skipped']} are start-up)")
    rows = [[i + 1, mode, r["steps"], r["samples"], f"{r['seconds']:.1f}", f"{r['per_min']:.1f}",
             _fmt(r["cores_busy"], ".2f"), _fmt(r["cpu_ms_per_sample"], ".0f"),
             f"{r['wall_s']:.1f}",
             f"{pair['ratio']:.2f}x" if mode == "concurrent" else ""]
            for i, pair in enumerate(pairs)
            for mode, r in ((m, pair[m]) for m in ("concurrent", "sequential"))]
    print_table(["pair", "loops", "timed steps", "samples", "seconds", "samples/min",
                 "cores busy", "CPU ms/sample", "wall s (all)", "ratio"], rows)
    ratio = result["ratio"]
    print(f"concurrent / sequential: {ratio:.2f}x, the median of {repeats} pair(s) (target "
          f">= 2x: {'met' if ratio >= 2.0 else 'not met'})")
    phases = _median_phases(pairs, "sequential_phases_s")
    print("sequential phases, median of the mean s per step: "
          + ", ".join(f"{name} {sec:.3f}" for name, sec in phases.items())
          + f"; perfect overlap of them would give at most {result['overlap_bound']:.2f}x "
          "(median over pairs)")
    compiles = sum(p[m]["compile_steps"] for p in pairs for m in ("concurrent", "sequential"))
    steady_phases = _median_phases(pairs, "steady_sequential_phases_s")
    print(f"without the {compiles} timed step(s) that compiled a new shape (a one-off per shape; "
          f"their samples and time left out): concurrent / sequential "
          f"{_fmt(result['steady_ratio'], '.2f')}x; phases "
          + ", ".join(f"{name} {sec:.3f}" for name, sec in steady_phases.items())
          + f", overlap bound {result['steady_overlap_bound']:.2f}x (medians over pairs)")
    busy = _median_or_none(p["sequential"]["cores_busy"] for p in pairs)
    if busy is None:
        print("cores busy: not measured (CPU times are read from /proc, Linux only)")
    else:
        print(f"the sequential run keeps {busy:.2f} of {pairs[0]['cores']} cores busy: the same "
              f"CPU work per sample on every core would give at most {result['cpu_bound']:.2f}x "
              "(median over pairs)")
    with open(os.path.join(root, "bench_async.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0
