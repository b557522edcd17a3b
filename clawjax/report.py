"""End-of-run report: a summary table on screen and `workdir/curve.png` (held-out score, mean
reward and OPD share against the training step), both read back from the run's files."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from clawjax.metrics import read_metrics


def _read_eval(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "eval.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
    errors and their paired change), training counts, rewards, drops, restarts."""
    rows = read_metrics(workdir)
    first, last = (evals[0].score, evals[-1].score) if evals else (float("nan"),) * 2
    first_tasks, last_tasks = (evals[0].task_scores, evals[-1].task_scores) if evals else ([], [])
    change, change_se = paired_change(first_tasks, last_tasks)
    drops = dict(proxy_stats.get("drops", {}))
    for reason, count in dict(trainer_drops).items():
        drops[f"trainer_{reason}"] = count
    return {
        "steps": rows[-1]["step"] if rows else 0,
        "samples_trained": int(sum(r.get("samples", 0) for r in rows)),
        "heldout_before": first, "heldout_after": last,
        "heldout_before_se": standard_error(first_tasks),
        "heldout_after_se": standard_error(last_tasks),
        "heldout_before_n": evals[0].n if evals else 0,
        "heldout_after_n": evals[-1].n if evals else 0,
        "heldout_change": change, "heldout_change_se": change_se,
        "heldout_curve": [(e.version, e.score) for e in evals],
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
    row("samples trained", summary["samples_trained"])
    for name, key in (("held-out score (warm start)", "before"), ("held-out score (final)", "after")):
        row(name, f"{summary[f'heldout_{key}']:.3f} ± {summary[f'heldout_{key}_se']:.3f} "
                  f"({summary[f'heldout_{key}_n']} answers)")
    change, se = summary["heldout_change"], summary["heldout_change_se"]
    row("held-out change, paired by task",
        f"{change:+.3f} ± {se:.3f} ({change / se:+.1f} standard errors)"
        if se > 0 else f"{change:+.3f}")
    row("mean reward, first / last 10 steps",
        f"{summary['mean_reward_first_10']:.3f} / {summary['mean_reward_last_10']:.3f}")
    row("samples emitted by kind", summary["emitted"])
    row("judge votes", summary["votes"])
    row("turns with a hint", f"{summary['hint_share']:.3f}")
    row("dropped, by reason", summary["drops"])
    gap = summary["logp_gap_last"]
    row("trainer-engine log-prob gap", f"{gap:.4f}" if isinstance(gap, float) else gap)
    row("process restarts", summary["restarts"])
    lines.append("-" * 60)
    return "\n".join(lines)


def write_curve(workdir: str) -> str:
    """Plots held-out score, mean reward and OPD share against the step → curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    evals = _read_eval(workdir)
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r.get("reward_mean", float("nan")) for r in rows], label="mean reward",
            alpha=0.5)
    ax.plot(steps, [r.get("opd_share", float("nan")) for r in rows], label="OPD share", alpha=0.5)
    versions = [(int(e["version"]) if str(e["version"]).isdigit() else 0, e["score"])
                for e in evals]
    if versions:
        ax.plot([v for v, _ in versions], [s for _, s in versions], "o-", color="black",
                label="held-out score")
    ax.set_xlabel("training step (policy version)")
    ax.set_ylim(-1.05, 1.05)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    path = os.path.join(workdir, "curve.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
