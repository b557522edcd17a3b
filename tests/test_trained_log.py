"""The trained-step log: lines appended per step, truncated to a restored step (torn and foreign
lines dropped, the file replaced whole, no file left behind when there was none)."""

from __future__ import annotations

import json

import pytest

from clawjax import trained_log


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_truncate_keeps_the_steps_up_to_the_restored_one(tmp_path):
    path = tmp_path / "trained.jsonl"
    for step in (1, 2, 3, 4):
        trained_log.append(str(path), step, [f"s{step}a", f"s{step}b"])
    trained_log.truncate(str(path), 2)
    assert _steps(path) == [1, 2]
    assert json.loads(path.read_text().splitlines()[1])["sample_ids"] == ["s2a", "s2b"]
    trained_log.append(str(path), 3, ["again"])   # the resumed run goes on after it
    assert _steps(path) == [1, 2, 3]


def test_torn_and_foreign_lines_are_dropped_and_the_rest_kept(tmp_path, caplog):
    path = tmp_path / "trained.jsonl"
    trained_log.append(str(path), 1, ["a"])
    with open(path, "a") as f:
        f.write('["not", "an", "entry"]\n\n{"step": 2, "sample_ids": ["b"]}')   # no newline
    trained_log.append(str(path), 3, ["c"])   # appended after a torn line: joined to it
    with open(path, "a") as f:
        f.write('{"step": 4, "sample_ids": ["d')   # torn by a crash
    trained_log.truncate(str(path), 9)
    assert _steps(path) == [1]
    assert path.read_text().endswith("\n")
    assert "line 2 is torn or not a trained-step entry" in caplog.text


def test_truncating_a_missing_log_creates_nothing(tmp_path):
    trained_log.truncate(str(tmp_path / "trained.jsonl"), 3)
    assert list(tmp_path.iterdir()) == []


def test_a_truncate_that_fails_leaves_the_log_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "trained.jsonl"
    for step in (1, 2, 3):
        trained_log.append(str(path), step, [f"s{step}"])
    whole = path.read_text()

    def full_disk(source, partial, step):
        with open(partial, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trained_log, "_copy_up_to", full_disk)
    with pytest.raises(OSError, match="No space"):
        trained_log.truncate(str(path), 1)
    assert path.read_text() == whole and sorted(p.name for p in tmp_path.iterdir()) == [
        "trained.jsonl"]
