"""End-of-run report: a summary table on screen and `workdir/curve.png` (held-out score, mean
reward and OPD share against the training step), both read back from the run's files.

Both describe the run's surviving lineage. A resume (after a crash) or a rollback (the
regression gate) trains some steps again, and `metrics.jsonl` keeps the rows of the discarded
ones, so a row whose step is not past the rows before it replaces them from its step on
(`lineage_rows`); with `trainer.log_every` > 1 only every N-th step has a row. The samples
trained are counted from the trained-step logs instead (`trained.jsonl`, and
`trained.process{i}.jsonl` of the other processes of a multi-process run), which the trainer
truncates to the restored step on each resume and rollback: one entry per trained step.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from clawjax.distributed import files_of_every_process


def _read_jsonl(path: str) -> list[dict]:
    """The objects of a JSON-lines log; a line that does not parse (half a line from a crash
    mid-append, which a resumed process then appended after) is skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                out.append(entry)
    return out


def _read_eval(workdir: str) -> list[dict]:
    return _read_jsonl(os.path.join(workdir, "eval.jsonl"))


def _version_number(version) -> int:
    """A weight version label's number on the curve's step axis (the warm start's is 0)."""
    return int(version) if str(version).isdigit() else 0


def lineage_rows(rows: list[dict], last_step: int | None = None) -> list[dict]:
    """The metrics rows of the surviving lineage, one per logged step, in step order: a row at
    step s drops the rows kept at steps >= s (they were trained again after a resume or a
    rollback); rows past `last_step` (the trained log's last step: a rollback after the last
    row) are dropped."""
    kept: list[dict] = []
    for row in rows:
        step = row.get("step")
        if not isinstance(step, int):
            continue
        while kept and kept[-1]["step"] >= step:
            kept.pop()
        kept.append(row)
    return [r for r in kept if last_step is None or r["step"] <= last_step]


def trained_steps(workdir: str) -> dict[int, int] | None:
    """{step: samples trained at it, over all processes} of the surviving lineage, from the
    trained-step logs; None when the workdir has none."""
    paths = files_of_every_process(os.path.join(workdir, "trained.jsonl"))
    if not paths:
        return None
    counts: dict[int, int] = {}
    for path in paths:
        entries = _read_jsonl(path)
        per_step = {e["step"]: len(e["sample_ids"]) for e in entries
                    if isinstance(e.get("step"), int) and isinstance(e.get("sample_ids"), list)}
        for step, n in per_step.items():
            counts[step] = counts.get(step, 0) + n
    return dict(sorted(counts.items()))


def standard_error(task_scores) -> float:
    """Standard error of a held-out score from its per-task scores `[T]`: sample standard
    deviation (ddof 1) over sqrt(T). Tasks, not answers, are the independent units (answers to
    one task are correlated). NaN below 2 tasks."""
    x = np.asarray(task_scores, np.float64)
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size >= 2 else float("nan")


def paired_change(before, after) -> tuple[float, float]:
    """(mean change, its standard error) of two evaluations over the same tasks in the same
    order (per-task scores `[T]` each): the paired difference, so task difficulty cancels.
    (NaN, NaN) when the task lists differ in length or hold fewer than 2 tasks."""
    b, a = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if b.shape != a.shape or b.size < 2:
        return float("nan"), float("nan")
    return float((a - b).mean()), standard_error(a - b)


def summarize(workdir: str, evals, proxy_stats: dict, trainer_drops, restarts: dict) -> dict:
    """The run's summary: held-out scores of the first and last evaluation (with standard
    errors and their paired change), training counts, rewards, drops, restarts.

    Counts and rewards are of the surviving lineage (module docstring): `steps` and
    `samples_trained` from the trained-step logs (`samples_trained_from`: "trained.jsonl";
    without them, "metrics.jsonl": the logged rows' `samples`, which miss unlogged steps); the
    rewards and the log-prob gap from its metrics rows, one per logged step (`logged_steps`).
    `heldout_*_n`: the answers judged; `heldout_*_unjudged`: those left out for want of a valid
    judge vote (`clawjax.evaluate`: every task keeps a score, so the change pairs by task).
    `heldout_mixed`: the evaluations answered by more than one weight version."""
    trained = trained_steps(workdir)
    last_step = max(trained, default=0) if trained is not None else None
    rows = lineage_rows(_read_jsonl(os.path.join(workdir, "metrics.jsonl")), last_step)
    if trained is not None:
        steps, samples, source = last_step, sum(trained.values()), "trained.jsonl"
    else:
        steps = rows[-1]["step"] if rows else 0
        samples, source = int(sum(r.get("samples", 0) for r in rows)), "metrics.jsonl"
    first, last = (evals[0].score, evals[-1].score) if evals else (float("nan"),) * 2
    first_tasks, last_tasks = (evals[0].task_scores, evals[-1].task_scores) if evals else ([], [])
    change, change_se = paired_change(first_tasks, last_tasks)
    drops = dict(proxy_stats.get("drops", {}))
    for reason, count in dict(trainer_drops).items():
        drops[f"trainer_{reason}"] = count
    return {
        "steps": steps,
        "samples_trained": int(samples), "samples_trained_from": source,
        "logged_steps": len(rows),
        "heldout_before": first, "heldout_after": last,
        "heldout_before_se": standard_error(first_tasks),
        "heldout_after_se": standard_error(last_tasks),
        "heldout_before_n": evals[0].n if evals else 0,
        "heldout_after_n": evals[-1].n if evals else 0,
        "heldout_before_unjudged": evals[0].unjudged if evals else 0,
        "heldout_after_unjudged": evals[-1].unjudged if evals else 0,
        "heldout_change": change, "heldout_change_se": change_se,
        "heldout_curve": [(e.version, e.score) for e in evals],
        "heldout_mixed": [{"version": e.version, "versions": e.versions}
                          for e in evals if len(e.versions) > 1],
        "mean_reward_first_10": _mean(rows[:10], "reward_mean"),
        "mean_reward_last_10": _mean(rows[-10:], "reward_mean"),
        "emitted": proxy_stats.get("emitted", {}), "votes": proxy_stats.get("votes", {}),
        "hint_share": proxy_stats.get("hint_share", 0.0), "drops": drops,
        "logp_gap_last": rows[-1].get("logp_gap") if rows else None,
        "restarts": restarts,
    }


def _mean(rows, key):
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(values) / len(values) if values else float("nan")


def table(summary: dict) -> str:
    lines = ["", "clawjax default run — summary", "-" * 60]

    def row(name, value):
        lines.append(f"{name:<36}  {value}")

    row("training steps", summary["steps"])
    row("samples trained", summary["samples_trained"]
        if summary.get("samples_trained_from", "trained.jsonl") == "trained.jsonl"
        else f"{summary['samples_trained']} (logged steps only: no trained.jsonl)")
    for name, key in (("held-out score (warm start)", "before"), ("held-out score (final)", "after")):
        answers = f"{summary[f'heldout_{key}_n']} answers"
        if summary.get(f"heldout_{key}_unjudged"):
            answers += f", {summary[f'heldout_{key}_unjudged']} unjudged left out"
        row(name, f"{summary[f'heldout_{key}']:.3f} ± {summary[f'heldout_{key}_se']:.3f} "
                  f"({answers})")
    change, se = summary["heldout_change"], summary["heldout_change_se"]
    row("held-out change, paired by task",
        f"{change:+.3f} ± {se:.3f} ({change / se:+.1f} standard errors)"
        if se > 0 else f"{change:+.3f}")
    logged = summary.get("logged_steps", summary["steps"])
    row("mean reward, first / last 10 steps" if logged >= summary["steps"] else
        f"mean reward, first / last 10 logged steps ({logged} of {summary['steps']} logged)",
        f"{summary['mean_reward_first_10']:.3f} / {summary['mean_reward_last_10']:.3f}")
    mixed = summary.get("heldout_mixed", [])
    if mixed:
        row("held-out points of several versions",
            ", ".join(f"{m['version']} ({'/'.join(m['versions'])})" for m in mixed))
    row("samples emitted by kind", summary["emitted"])
    row("judge votes", summary["votes"])
    row("turns with a hint", f"{summary['hint_share']:.3f}")
    row("dropped, by reason", summary["drops"])
    gap = summary["logp_gap_last"]
    row("trainer-engine log-prob gap", f"{gap:.4f}" if isinstance(gap, float) else gap)
    row("process restarts", summary["restarts"])
    lines.append("-" * 60)
    return "\n".join(lines)


def curve_series(workdir: str) -> dict:
    """What curve.png plots, one point per step and per version: `steps`, `reward_mean` and
    `opd_share` of the lineage's metrics rows (`lineage_rows`); `heldout`: (first version, last
    version, score) of each evaluation in eval.jsonl, an evaluation at a version not past the
    ones before it replacing them from that version on (a resumed process evaluates its warm
    start and its own lineage's versions again). The two versions differ for a periodic point
    answered by several versions."""
    trained = trained_steps(workdir)
    rows = lineage_rows(_read_jsonl(os.path.join(workdir, "metrics.jsonl")),
                        max(trained, default=0) if trained is not None else None)
    points: list[tuple[int, int, float]] = []
    for e in _read_eval(workdir):
        spread = [_version_number(v) for v in e.get("versions") or {}] or [0]
        first = _version_number(e["version"])
        while points and points[-1][0] >= first:
            points.pop()
        points.append((first, max(first, *spread), e["score"]))
    return {"steps": [r["step"] for r in rows],
            "reward_mean": [r.get("reward_mean", float("nan")) for r in rows],
            "opd_share": [r.get("opd_share", float("nan")) for r in rows],
            "heldout": points}


def write_curve(workdir: str) -> str:
    """Plots held-out score, mean reward and OPD share against the step → curve.png (the
    points of `curve_series`; a held-out point answered by several versions is drawn hollow,
    a bar spanning its versions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = curve_series(workdir)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(series["steps"], series["reward_mean"], label="mean reward", alpha=0.5)
    ax.plot(series["steps"], series["opd_share"], label="OPD share", alpha=0.5)
    points = series["heldout"]
    if points:
        ax.plot([v for v, _, _ in points], [s for _, _, s in points], "-", color="black")
        single = [(v, s) for v, last, s in points if last == v]
        mixed = [(v, last, s) for v, last, s in points if last != v]
        ax.plot([v for v, _ in single], [s for _, s in single], "o", color="black",
                label="held-out score")
        if mixed:
            ax.errorbar([v for v, _, _ in mixed], [s for _, _, s in mixed],
                        xerr=[[0] * len(mixed), [last - v for v, last, _ in mixed]], fmt="o",
                        mfc="white", color="black", capsize=3,
                        label="held-out score, answered by several versions")
    ax.set_xlabel("training step (policy version)")
    ax.set_ylim(-1.05, 1.05)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    path = os.path.join(workdir, "curve.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
