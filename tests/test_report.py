"""The end-of-run report's statistics: standard errors over held-out tasks and the paired change
between the first and last evaluation, checked against a float64 reference written with the
standard library; and the summary table that prints them."""

import json
import math
import os
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


def test_summary_and_table_count_the_answers_left_out_unjudged(tmp_path):
    """An answer the judge gave no valid vote is left out of the score (`clawjax.evaluate`);
    the summary says how many, next to the answers judged."""
    before = _result("0", [0.0, 0.5])
    after = EvalResult(version="8", score=0.75, n=14, seconds=1.0, examples=[],
                       task_scores=[0.5, 1.0], unjudged=2)
    summary = report.summarize(str(tmp_path), [before, after], {}, {}, {})
    assert summary["heldout_before_unjudged"] == 0 and summary["heldout_after_unjudged"] == 2
    assert summary["heldout_after_n"] == 14
    assert after.to_json()["unjudged"] == 2
    text = report.table(summary)
    assert "(8 answers)\n" in text and "(14 answers, 2 unjudged left out)\n" in text


# ------------------------------------------------------------------ the surviving lineage
def _write_jsonl(path, entries, tail=""):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries) + tail)


def _trained(steps, per_step):
    return [{"step": s, "sample_ids": [f"s{s}-{i}" for i in range(per_step)]} for s in steps]


def test_samples_trained_come_from_the_trained_log_not_the_logged_rows(tmp_path):
    # trainer.log_every = 3: rows at steps 3 and 6 only; every step trained 2 samples.
    _write_jsonl(tmp_path / "metrics.jsonl", [
        {"step": 3, "samples": 2, "reward_mean": 0.0, "logp_gap": 0.1},
        {"step": 6, "samples": 2, "reward_mean": 1.0, "logp_gap": 0.2}])
    _write_jsonl(tmp_path / "trained.jsonl", _trained(range(1, 7), 2))
    summary = report.summarize(str(tmp_path), [], {}, {}, {})
    assert summary["steps"] == 6 and summary["samples_trained"] == 12
    assert summary["samples_trained_from"] == "trained.jsonl"
    assert summary["logged_steps"] == 2
    assert summary["mean_reward_first_10"] == summary["mean_reward_last_10"] == 0.5
    text = report.table(summary)
    assert "mean reward, first / last 10 logged steps (2 of 6 logged)" in text


def test_summary_after_a_resume_counts_the_surviving_lineage_once(tmp_path):
    # Checkpoint at 2, crash after step 3's row; the resumed process trains 3 and 4 again. Two
    # processes: process 1 keeps its own trained log; process 0's ends in a torn line.
    _write_jsonl(tmp_path / "metrics.jsonl", [
        {"step": 1, "samples": 2, "reward_mean": 0.0},
        {"step": 2, "samples": 2, "reward_mean": 0.0},
        {"step": 3, "samples": 2, "reward_mean": -1.0, "logp_gap": 9.0},   # discarded
        {"step": 3, "samples": 2, "reward_mean": 1.0, "logp_gap": 0.5},
        {"step": 4, "samples": 2, "reward_mean": 1.0, "logp_gap": 0.25}])
    _write_jsonl(tmp_path / "trained.jsonl", _trained(range(1, 5), 2), tail='{"step": 5, "sam')
    _write_jsonl(tmp_path / "trained.process1.jsonl", _trained(range(1, 5), 3))
    summary = report.summarize(str(tmp_path), [], {}, {}, {})
    assert summary["steps"] == 4
    assert summary["samples_trained"] == 4 * 2 + 4 * 3
    assert summary["logged_steps"] == 4
    assert summary["mean_reward_first_10"] == pytest.approx(0.5)
    assert summary["logp_gap_last"] == 0.25
    assert "mean reward, first / last 10 steps" in report.table(summary)


def test_lineage_rows_keep_the_last_row_of_each_step_on_the_final_path():
    rows = [{"step": s, "k": k} for k, s in enumerate([1, 2, 3, 4, 5, 3, 4, 6, 2, 3])]
    # the row at 3 rewinds past 4 and 5; the row at 2 past 3, 4 and 6
    assert [(r["step"], r["k"]) for r in report.lineage_rows(rows)] == [(1, 0), (2, 8), (3, 9)]
    # a rollback after the last row (no row after it): the trained log's last step bounds it
    assert [r["step"] for r in report.lineage_rows(rows, last_step=2)] == [1, 2]
    assert report.lineage_rows([]) == []


def test_without_a_trained_log_the_summary_counts_the_logged_rows_and_says_so(tmp_path):
    _write_jsonl(tmp_path / "metrics.jsonl", [
        {"step": 1, "samples": 8, "reward_mean": -1.0}, {"step": 2, "samples": 8},
        {"step": 1, "samples": 4, "reward_mean": 0.0}, {"step": 2, "samples": 4}])
    summary = report.summarize(str(tmp_path), [], {}, {}, {})
    assert summary["steps"] == 2 and summary["samples_trained"] == 8
    assert summary["samples_trained_from"] == "metrics.jsonl"
    assert "8 (logged steps only: no trained.jsonl)" in report.table(summary)


def test_the_curve_plots_each_step_and_version_once_after_a_resume(tmp_path):
    _write_jsonl(tmp_path / "metrics.jsonl", [
        {"step": s, "reward_mean": 0.1 * s, "opd_share": 0.5} for s in (1, 2, 3, 4, 3, 4, 5)])
    _write_jsonl(tmp_path / "trained.jsonl", _trained(range(1, 6), 1))
    # the first process: warm start, versions 2 and 4; the resumed one starts again from
    # the warm start ("default"), then 4 (of its own lineage) and a point spanning 4..6
    _write_jsonl(tmp_path / "eval.jsonl", [
        {"version": "default", "score": 0.1, "n": 4},
        {"version": "2", "score": 0.2, "n": 4}, {"version": "4", "score": 0.3, "n": 4},
        {"version": "default", "score": 0.1, "n": 4}, {"version": "4", "score": 0.4, "n": 4},
        {"version": "4", "score": 0.5, "n": 4, "versions": {"4": 2, "6": 2}}])
    series = report.curve_series(str(tmp_path))
    assert series["steps"] == [1, 2, 3, 4, 5]
    assert series["reward_mean"] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert series["heldout"] == [(0, 0, 0.1), (4, 6, 0.5)]
    assert os.path.exists(report.write_curve(str(tmp_path)))


def test_summary_names_the_periodic_points_answered_by_several_versions(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "samples": 1}\n')
    before = _result("default", [0.0, 0.5])
    mixed = EvalResult(version="2", score=0.5, n=8, seconds=1.0, examples=[],
                       task_scores=[0.5, 0.5], versions={"2": 4, "4": 4})
    after = _result("6", [0.5, 1.0])
    summary = report.summarize(str(tmp_path), [before, mixed, after], {}, {}, {})
    assert summary["heldout_mixed"] == [{"version": "2", "versions": {"2": 4, "4": 4}}]
    assert "held-out points of several versions   2 (2/4)\n" in report.table(summary)  # aligned
