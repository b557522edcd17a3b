"""The end-of-run report's statistics: standard errors over held-out tasks and the paired change
between the first and last evaluation, checked against a float64 reference written with the
standard library; and the summary table that prints them."""

import math
import statistics

import numpy as np
import pytest

from clawjax import report
from clawjax.evaluate import EvalResult

TOL = 1e-12


def _reference_se(values) -> float:
    return statistics.stdev(values) / math.sqrt(len(values))


def test_standard_error_matches_the_reference():
    rng = np.random.default_rng(0)
    scores = (rng.integers(0, 5, size=24) / 4).tolist()   # 24 tasks, 4 answers each
    assert report.standard_error(scores) == pytest.approx(_reference_se(scores), abs=TOL)
    assert math.isnan(report.standard_error([0.5]))
    assert math.isnan(report.standard_error([]))
    assert report.standard_error([0.25, 0.25, 0.25]) == 0.0


def test_paired_change_cancels_task_difficulty():
    rng = np.random.default_rng(1)
    difficulty = rng.random(30)
    before = difficulty.tolist()
    after = (difficulty + 0.1 + rng.normal(0, 0.01, 30)).tolist()
    change, se = report.paired_change(before, after)
    diffs = [a - b for a, b in zip(after, before)]
    assert change == pytest.approx(statistics.fmean(diffs), abs=TOL)
    assert se == pytest.approx(_reference_se(diffs), abs=TOL)
    # Unpaired, the spread of task difficulty would swamp a change this small.
    assert se < 0.01 < math.hypot(report.standard_error(before), report.standard_error(after))
    assert all(math.isnan(x) for x in report.paired_change(before, after[:-1]))
    assert all(math.isnan(x) for x in report.paired_change([0.1], [0.2]))


def _result(version, task_scores, k=4):
    return EvalResult(version=version, score=float(np.mean(task_scores)),
                      n=len(task_scores) * k, seconds=1.0, examples=[], task_scores=task_scores)


def test_summary_and_table_show_scores_with_standard_errors(tmp_path):
    before = _result("0", [0.0, 0.25, 0.0, 0.5])
    middle = _result("10", [0.5, 0.5, 0.5, 0.5])
    after = _result("50", [0.25, 0.5, 0.25, 1.0])
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "samples": 8, "reward_mean": -0.5}\n'
        '{"step": 2, "samples": 8, "reward_mean": 0.5}\n')
    summary = report.summarize(str(tmp_path), [before, middle, after], {}, {}, {})
    assert summary["steps"] == 2 and summary["samples_trained"] == 16
    assert summary["heldout_before"] == pytest.approx(0.1875)
    assert summary["heldout_after"] == pytest.approx(0.5)
    assert summary["heldout_before_n"] == summary["heldout_after_n"] == 16
    assert summary["heldout_after_se"] == pytest.approx(_reference_se(after.task_scores))
    assert summary["heldout_change"] == pytest.approx(0.3125)
    assert summary["heldout_change_se"] == pytest.approx(_reference_se([0.25, 0.25, 0.25, 0.5]))
    text = report.table(summary)
    se = _reference_se([0.25, 0.25, 0.25, 0.5])
    assert f"0.500 ± {summary['heldout_after_se']:.3f} (16 answers)" in text
    assert f"+0.312 ± {se:.3f} ({0.3125 / se:+.1f} standard errors)" in text


def test_eval_result_json_carries_the_task_scores():
    result = _result("3", [0.0, 1.0])
    assert result.to_json()["task_scores"] == [0.0, 1.0]
