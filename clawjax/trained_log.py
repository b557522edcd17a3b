"""The trained-step log: `trained.jsonl` (`trained.process{i}.jsonl` for process i > 0 of a
multi-process run), one line per trained step, `{"step": s, "sample_ids": [...]}` — the ids this
process trained at step s.

`TrainLoop` appends a line right after each update and, on a resume or a rollback to step s,
keeps only the lines up to s (`truncate`): the log holds the surviving lineage, which
`clawjax.report` counts trained samples from. A line that does not parse (half a line from a
crash mid-append) is dropped there: the checkpoint, not this log, is what a resume goes on from.
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger("clawjax.train")


def append(path: str, step: int, sample_ids: list[str]) -> None:
    """Adds the line of `step` (the step just trained) with the ids trained at it."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "sample_ids": sample_ids}) + "\n")


def truncate(path: str, step: int) -> None:
    """Keeps the lines of steps up to `step`, replacing the file whole (a crash leaves the old
    file or the new one), one line in memory at a time (a week's log is tens of MB). Torn or
    foreign lines are dropped and logged. No file: nothing to do."""
    if not os.path.exists(path):
        return
    partial = path + ".partial"
    try:
        _copy_up_to(path, partial, step)
    except BaseException:
        if os.path.exists(partial):   # a full disk, say: the log stays as it was
            os.unlink(partial)
        raise
    os.replace(partial, path)


def _copy_up_to(path: str, partial: str, step: int) -> None:
    """Writes to `partial` the good lines of `path` with steps up to `step`."""
    with open(path) as old, open(partial, "w") as kept:
        for number, line in enumerate(old, 1):
            if not line.strip():
                continue
            try:
                entry_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                log.warning("%s line %d is torn or not a trained-step entry: dropped (%r)",
                            path, number, line[:80])
                continue
            if entry_step <= step:
                kept.write(line if line.endswith("\n") else line + "\n")
