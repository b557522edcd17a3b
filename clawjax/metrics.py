"""Per-step metrics: `workdir/metrics.jsonl`, TensorBoard events (tensorboardX, no TensorFlow)
and a progress bar with the numbers a user watches (step, samples, tokens/s, loss, reward,
clipfrac, staleness)."""

from __future__ import annotations

import json
import math
import os
import time

# The bar counts steps; beside it, the step's numbers (`samples`: of the step, every process's).
PROGRESS_KEYS = ("samples", "loss", "reward_mean", "clipfrac", "staleness_mean", "tokens_per_s")


def sample_stats(samples, version_before: int) -> list:
    """One process's share of a step, as `sample_metrics` adds them up (JSON numbers): count,
    tokens, reward sum, samples with a teacher context, staleness sum and max (`version_before`
    minus each sample's policy version)."""
    staleness = [int(version_before - s.policy_version) for s in samples]
    return [len(samples), sum(len(s.tokens) for s in samples),
            float(sum(s.reward for s in samples)), sum(1 for s in samples if s.has_teacher),
            sum(staleness), max(staleness)]


def sample_metrics(shares: list[list], elapsed_s: float) -> dict:
    """The step's sample metrics from every process's `sample_stats` (`shares`, one per
    process: each trains its own share): `samples`, `tokens`, `tokens_per_s`, `reward_mean`,
    `opd_share` (samples with a teacher context), `staleness_mean` and `staleness_max`."""
    count, tokens, reward, teacher, stale, _ = (sum(column) for column in zip(*shares))
    return dict(samples=int(count), tokens=int(tokens), tokens_per_s=tokens / max(elapsed_s, 1e-9),
                reward_mean=float(reward) / count, opd_share=teacher / count,
                staleness_mean=stale / count,
                staleness_max=float(max(share[5] for share in shares)))


def _plain(value):
    value = float(value) if hasattr(value, "__float__") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends one JSON object per step to `metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, total_steps: int | None = None, progress: bool = True,
                 filename: str = "metrics.jsonl", tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, filename)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # TensorBoard events are optional
                pass
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": int(step), "time": time.time()}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self._tb.add_scalar(key, value, step)
        if self._bar is not None:
            shown = {k: f"{record[k]:.4g}" for k in PROGRESS_KEYS
                     if isinstance(record.get(k), (int, float))}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(max(int(step) - self._bar.n, 0))  # to `step`: lines may skip

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
