"""Per-step metrics: the sample metrics of a step (against NumPy) and the progress bar's fields
(issue 6: step, samples, tokens/s, loss, mean reward, clipfrac, staleness)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clawjax.metrics import MetricsWriter, sample_metrics, sample_stats
from sample_factory import make_samples


def test_sample_metrics_of_one_process_match_numpy():
    samples = make_samples(6, seed=4)
    for i, s in enumerate(samples):
        s.policy_version = i % 3
        s.reward = float(i) - 2.5
    got = sample_metrics([sample_stats(samples, version_before=4)], elapsed_s=0.5)
    staleness = np.asarray([4 - s.policy_version for s in samples], np.float64)
    tokens = sum(len(s.tokens) for s in samples)
    assert got["samples"] == 6 and got["tokens"] == tokens
    np.testing.assert_allclose(
        [got["tokens_per_s"], got["reward_mean"], got["opd_share"], got["staleness_mean"],
         got["staleness_max"]],
        [tokens / 0.5, np.mean([s.reward for s in samples]),
         np.mean([s.has_teacher for s in samples]), staleness.mean(), staleness.max()],
        rtol=1e-12)


def test_sample_metrics_of_two_shares_are_those_of_all_their_samples():
    samples = make_samples(7, seed=5)
    for i, s in enumerate(samples):
        s.policy_version, s.reward = i, float(i % 3)
    whole = sample_metrics([sample_stats(samples, 6)], elapsed_s=2.0)
    halves = sample_metrics([sample_stats(samples[:3], 6), sample_stats(samples[3:], 6)], 2.0)
    assert halves == pytest.approx(whole, rel=1e-12)


def test_the_progress_bar_shows_the_step_and_its_numbers(tmp_path, capsys):
    writer = MetricsWriter(str(tmp_path), total_steps=3, tensorboard=False)
    writer.write(1, {"samples": 16, "loss": 0.25, "reward_mean": 0.5, "clipfrac": 0.125,
                     "staleness_mean": 1.0, "tokens_per_s": 900.0})
    writer.close()
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "1/3" in bar, bar
    for shown in ("samples=16", "loss=0.25", "reward_mean=0.5", "clipfrac=0.125",
                  "staleness_mean=1", "tokens_per_s=900"):
        assert shown in bar, (shown, bar)
    with open(tmp_path / "metrics.jsonl") as f:
        assert json.loads(f.readline())["samples"] == 16
