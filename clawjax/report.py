"""End-of-run report: a summary table on screen and `workdir/curve.png` (held-out score, mean
reward and OPD share against the training step), both read back from the run's files."""

from __future__ import annotations

import json
import os

from clawjax.metrics import read_metrics


def _read_eval(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "eval.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(workdir: str, evals, proxy_stats: dict, trainer_drops, restarts: dict) -> dict:
    rows = read_metrics(workdir)
    first, last = (evals[0].score, evals[-1].score) if evals else (float("nan"),) * 2
    drops = dict(proxy_stats.get("drops", {}))
    for reason, count in dict(trainer_drops).items():
        drops[f"trainer_{reason}"] = count
    return {
        "steps": rows[-1]["step"] if rows else 0,
        "samples_trained": int(sum(r.get("samples", 0) for r in rows)),
        "heldout_before": first, "heldout_after": last,
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
    row("held-out score (warm start)", f"{summary['heldout_before']:.3f}")
    row("held-out score (final)", f"{summary['heldout_after']:.3f}")
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
