"""Smoke tests of `python -m clawjax.bench methods` and `python -m clawjax.bench async` at
`--quick` size: each runs end to end as a user would, prints its table with finite numbers and
writes its result files. (No timing assertions: the rates are only checked to be finite > 0.)"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from clawjax.bench import _runs, async_loops, methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    """One root for both benches: the async bench reuses the methods bench's warm start."""
    return tmp_path_factory.mktemp("bench")


def bench(*args: str, timeout_s: float = 600) -> str:
    proc = subprocess.run([sys.executable, "-m", "clawjax.bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def table_rows(out: str, header_start: str) -> list[list[str]]:
    """The rows after the header line starting with `header_start` and its dashes line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    assert set(lines[start + 1].replace(" ", "")) == {"-"}, lines[start + 1]
    rows = []
    for line in lines[start + 2:]:
        if not line.strip() or not re.match(r"^\S", line) or line.startswith(("combine >=",
                                                                              "concurrent /")):
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def test_per_method_stats_against_hand_computed():
    results = [{"method": "rl", "seed": 0, "before": 0.1, "after": 0.3},
               {"method": "rl", "seed": 1, "before": 0.1, "after": 0.5},
               {"method": "combine", "seed": 0, "before": 0.2, "after": 0.6}]
    stats = methods.per_method(results)
    assert set(stats) == {"rl", "combine"}
    assert stats["rl"]["mean"] == pytest.approx(0.4, abs=1e-12)
    assert stats["rl"]["std"] == pytest.approx(math.sqrt(0.02), abs=1e-12)  # sample std
    assert stats["rl"]["delta_mean"] == pytest.approx(0.3, abs=1e-12)
    assert stats["combine"]["std"] == 0.0
    assert "undecided" in methods.report(results, stats)
    results.append({"method": "opd", "seed": 0, "before": 0.2, "after": 0.7})
    verdict = methods.report(results, methods.per_method(results))
    assert verdict.startswith("combine >= max(rl, opd): no")


def test_trained_rate_leaves_out_the_first_step(tmp_path):
    rows = [{"step": 1, "time": 100.0, "samples": 16}, {"step": 2, "time": 130.0, "samples": 8},
            {"step": 3, "time": 160.0, "samples": 16}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rate = _runs.trained_rate(str(tmp_path))
    assert rate["samples"] == 24 and rate["steps"] == 2
    assert rate["per_min"] == pytest.approx(60.0 * 24 / 60.0)


def test_steady_figures_leave_out_the_steps_that_compiled(tmp_path):
    """Step 3 met a new shape (12 s, mostly compiling): the steady rate and phases drop its
    samples and its interval; the plain figures keep them."""
    rows = [{"step": 1, "time": 100.0, "samples": 16, "compiled": 1.0},
            {"step": 2, "time": 102.0, "samples": 16, "compiled": 0.0},
            {"step": 3, "time": 114.0, "samples": 16, "compiled": 1.0},
            {"step": 4, "time": 116.0, "samples": 8, "compiled": 0.0}]
    for r in rows:
        r.update(rollout_s=1.0, step_time_s=12.0 if r["step"] == 3 else 0.5, publish_wait_s=0.5)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rate = _runs.trained_rate(str(tmp_path))  # timed: steps 2-4 (the first is start-up)
    assert rate["per_min"] == pytest.approx(60.0 * 40 / 16.0)
    assert rate["compile_steps"] == 1 and rate["steady_seconds"] == pytest.approx(4.0)
    assert rate["steady_per_min"] == pytest.approx(60.0 * 24 / 4.0)
    assert _runs.phase_seconds(str(tmp_path))["train"] == pytest.approx(13.0 / 3)
    assert _runs.phase_seconds(str(tmp_path), steady=True) == pytest.approx(
        {"rollout": 1.0, "train": 0.5, "publish": 0.5})


def test_phase_seconds_and_the_overlap_bound_by_hand(tmp_path):
    rows = [{"step": 1, "rollout_s": 9.0, "step_time_s": 9.0, "publish_wait_s": 9.0},
            {"step": 2, "rollout_s": 0.3, "step_time_s": 0.1, "publish_wait_s": 0.2},
            {"step": 3, "rollout_s": 0.5, "step_time_s": 0.1, "publish_wait_s": 0.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    phases = _runs.phase_seconds(str(tmp_path))  # the first row is start-up: left out
    assert phases == pytest.approx({"rollout": 0.4, "train": 0.1, "publish": 0.1})


def test_bench_async_refuses_a_bad_config_override(capsys):
    """Anything but a known, non-reserved `--config.KEY=VALUE` is refused before a run starts,
    with the argument named."""
    assert async_loops.config_overrides(["--config.rollout.agents=16"]) == \
        ["--config.rollout.agents=16"]
    for arg, reason in (("--agents=16", "expected --config.KEY=VALUE"),
                        ("--config.rollout.agnets=16", "'rollout.agnets' is not in"),
                        ("--config.rollout.agents.x=1", "'rollout.agents.x' is not in"),
                        ("--config.trainer.steps=5", "set by the bench itself"),
                        ("--config.workdir=/tmp/x", "set by the bench itself"),
                        ("--config.rollout.agents", "expected --config.KEY=VALUE")):
        with pytest.raises(SystemExit) as exit_info:
            async_loops.main(["--workdir", "/nonexistent/never-created", arg])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert repr(arg) in err and reason in err, err
    assert not os.path.exists("/nonexistent/never-created")


def test_summarize_takes_the_median_over_pairs_by_hand():
    """The bench's figures are medians over its pairs (robust to one noisy run); a bound not
    measured in any pair (CPU times off /proc) is None, not a median of the others."""
    def pair(ratio, bound, steady, cpu):
        return {"ratio": ratio, "overlap_bound": bound, "steady_ratio": steady,
                "steady_overlap_bound": bound + 0.5, "cpu_bound": cpu}

    pairs = [pair(1.2, 2.0, 1.0, 3.0), pair(0.4, 1.1, None, 2.0), pair(1.5, 2.9, 2.0, 1.0)]
    result = async_loops.summarize(pairs)
    assert result["pairs"] is pairs
    assert (result["ratio"], result["overlap_bound"], result["steady_overlap_bound"],
            result["cpu_bound"]) == (1.2, 2.0, 2.5, 2.0)
    assert result["steady_ratio"] is None  # pair 2 had no steady step
    even = async_loops.summarize(pairs[:1] + pairs[2:])  # two pairs: the mean of the middle two
    assert even["ratio"] == pytest.approx(1.35) and even["steady_ratio"] == pytest.approx(1.5)
    assert even["cpu_bound"] == pytest.approx(2.0)
    assert async_loops.summarize(pairs[1:2])["ratio"] == 0.4


# The two whole-loop bench smoke runs start 4 servers per run (5 runs): marked slow, ~2.5 min
# together on 2 idle cores, so they run in the suite; CLAWJAX_BENCH_SMOKE=0 skips them.
needs_opt_in = pytest.mark.skipif(os.environ.get("CLAWJAX_BENCH_SMOKE") == "0",
                                  reason="whole-loop bench smoke runs skipped: CLAWJAX_BENCH_SMOKE=0")


@pytest.mark.slow
@needs_opt_in
def test_bench_methods_quick(bench_root):
    tmp_path = bench_root
    out = bench("methods", "--quick", "--workdir", str(tmp_path))
    rows = table_rows(out, "method")
    runs = [r for r in rows if r[1] != "mean ± std"]
    assert sorted(r[0] for r in runs) == ["combine", "opd", "rl"]
    for method, seed, before, after, delta in runs:
        assert seed == "0"
        values = [float(before), float(after), float(delta)]
        assert all(math.isfinite(v) for v in values)
        assert 0.0 <= values[0] <= 1.0 and 0.0 <= values[1] <= 1.0
        assert values[2] == pytest.approx(values[1] - values[0], abs=2e-3)
    assert sum(r[1] == "mean ± std" for r in rows) == 3
    assert re.search(r"^combine >= max\(rl, opd\): (yes|no) ", out, re.M)
    assert (tmp_path / "bench_methods.png").stat().st_size > 0
    # One warm start for all: the first run's was copied into the others, not retrained.
    fingerprints = {json.loads((tmp_path / f"{m}-s0" / "warmstart" / "warmstart.json")
                               .read_text())["fingerprint"] for m in ("rl", "opd", "combine")}
    assert len(fingerprints) == 1
    # One XLA cache for all: the later runs load what the first compiled.
    assert any((tmp_path / "xla_cache").iterdir())
    assert not any((tmp_path / f"{m}-s0" / "xla_cache").exists() for m in ("rl", "opd", "combine"))


@pytest.mark.slow
@needs_opt_in
def test_bench_async_quick(bench_root):
    tmp_path = bench_root
    out = bench("async", "--quick", "--steps", "3", "--workdir", str(tmp_path),
                "--config.rollout.agents=3")  # --quick: one pair (medians: test_summarize_*)
    rows = table_rows(out, "pair")
    assert [(r[0], r[1]) for r in rows] == [("1", "concurrent"), ("1", "sequential")]
    for row in rows:
        steps, samples, seconds, per_min, busy, cpu_ms, wall = row[2:9]
        assert int(steps) == 2 and int(samples) > 0
        assert all(math.isfinite(float(v)) and float(v) > 0
                   for v in (seconds, per_min, busy, cpu_ms, wall))
    ratio = re.search(r"^concurrent / sequential: ([0-9.]+)x, the median of 1", out, re.M)
    assert ratio and float(ratio.group(1)) > 0
    result = json.loads((tmp_path / "bench_async.json").read_text())
    pairs = result["pairs"]
    assert len(pairs) == 1
    for pair in pairs:
        assert pair["ratio"] == pytest.approx(pair["concurrent"]["per_min"]
                                              / pair["sequential"]["per_min"])
        phases = pair["sequential_phases_s"]
        assert set(phases) == {"rollout", "train", "publish"} and min(phases.values()) >= 0
        assert pair["overlap_bound"] == pytest.approx(sum(phases.values()) / max(phases.values()))
        assert 1.0 <= pair["overlap_bound"] <= 3.0
        for mode in ("concurrent", "sequential"):
            run = pair[mode]  # a whole process tree busy, on at most every core (+ rounding)
            assert 0.0 < run["cores_busy"] <= pair["cores"] + 0.25
            assert run["cpu_ms_per_sample"] == pytest.approx(
                1e3 * run["cores_busy"] * run["seconds"] / run["samples"])
        assert pair["cpu_bound"] == pytest.approx(pair["cores"]
                                                  / pair["sequential"]["cores_busy"])
    assert result["ratio"] == pytest.approx(pairs[0]["ratio"])  # the median of one
    assert float(ratio.group(1)) == pytest.approx(result["ratio"], abs=0.005)  # printed .2f
    # A --config override reaches both runs of every pair, after the bench's own (so it wins
    # over --quick's rollout.agents=4).
    assert result["overrides"][-1] == "--config.rollout.agents=3"
    assert "overrides: --config.rollout.agents=3" in out
    for i in (1,):
        for mode in ("concurrent", "sequential"):
            command = (tmp_path / f"{mode}-{i}" / "run.log").read_text().splitlines()[0]
            args = command.split()
            assert args[0] == "$" and args[-1] == "--config.rollout.agents=3", command
            assert args.index("--config.rollout.agents=4") < len(args) - 1
    for i in (1,):
        seq = json.loads((tmp_path / f"sequential-{i}" / "sequential_summary.json").read_text())
        assert seq["steps"] == 3
    assert re.search(r"perfect overlap of them would give at most [0-9.]+x", out)
    # The steady figures: every step's `compiled` flag is read (a missing one would count as 0).
    for i, pair in enumerate(pairs, 1):
        for mode in ("concurrent", "sequential"):
            run_dir = tmp_path / f"{mode}-{i}"
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
            assert rows[0]["compiled"] == 1.0 and all(r["compiled"] in (0.0, 1.0) for r in rows)
            # Both modes compile on the same footing: each into its own, initially empty cache.
            assert (run_dir / "xla_cache").is_dir()
        steady = pair["steady_sequential_phases_s"]
        assert pair["steady_overlap_bound"] == pytest.approx(
            sum(steady.values()) / max(steady.values()))
    assert re.search(r"without the \d+ timed step\(s\) that compiled a new shape .* "
                     r"concurrent / sequential ([0-9.]+|n/a)x", out)
    assert re.search(r"keeps [0-9.]+ of \d+ cores busy: .* at most [0-9.]+x", out)
