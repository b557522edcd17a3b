"""The default task's prompt split: rollout, held-out and gate-probe prompts are disjoint, cover
every (template, a, b) triple once, and do not depend on anything but the seed."""

from __future__ import annotations

import pytest

from clawjax import default_task
from clawjax.default_run import PROBE_TASKS, task_split
from configs.default import get_config


def ids(tasks: list[dict]) -> list[str]:
    return [t["task_id"] for t in tasks]


def test_split_tasks_covers_every_triple_once():
    train, heldout = default_task.split_tasks(0.1, seed=0)
    n = len(default_task.TEMPLATES) * len(default_task.DIGITS) ** 2
    assert len(train) + len(heldout) == n
    assert len(set(ids(train)) | set(ids(heldout))) == n
    assert len(heldout) == int(n * 0.1)


def test_split_probe_is_a_seeded_partition_in_order():
    train, _ = default_task.split_tasks(0.1, seed=0)
    rollout, probe = default_task.split_probe(train, 32, seed=0)
    assert len(probe) == 32 and len(rollout) == len(train) - 32
    assert not set(ids(rollout)) & set(ids(probe))
    position = {tid: i for i, tid in enumerate(ids(train))}
    for part in (rollout, probe):   # both keep the input's order
        assert [position[t] for t in ids(part)] == sorted(position[t] for t in ids(part))
    assert default_task.split_probe(train, 32, seed=0) == (rollout, probe)
    assert ids(default_task.split_probe(train, 32, seed=1)[1]) != ids(probe)
    # A seeded sample, not the first n of the sorted list (which would be one template only).
    assert len({t["task_id"].split("-")[1] for t in probe}) == len(default_task.TEMPLATES)


@pytest.mark.parametrize("n", [0, -1, 10])
def test_split_probe_refuses_sizes_that_leave_nothing_to_roll_out(n):
    tasks = [default_task.task(0, 1, b) for b in range(1, 11)]
    with pytest.raises(ValueError, match=rf"probe size n = {n}, expected between 1 and 9"):
        default_task.split_probe(tasks, n)


def test_default_run_rolls_out_no_probe_or_heldout_prompt():
    config = get_config()
    assert config.gate.enabled and not config.gate.probe
    rollout, heldout, probe = task_split(config)
    assert len(probe) == PROBE_TASKS
    assert not set(ids(rollout)) & set(ids(probe))
    assert not set(ids(rollout)) & set(ids(heldout))
    assert not set(ids(probe)) & set(ids(heldout))
    train, _ = default_task.split_tasks(config.warmstart.heldout_share, config.warmstart.seed)
    assert sorted(ids(rollout) + ids(probe)) == sorted(ids(train))


@pytest.mark.parametrize("gate", [{"enabled": False}, {"probe": "my_probe.jsonl"}])
def test_without_a_generated_probe_every_training_prompt_is_rolled_out(gate):
    config = get_config()
    for key, value in gate.items():
        setattr(config.gate, key, value)
    rollout, _, probe = task_split(config)
    train, _ = default_task.split_tasks(config.warmstart.heldout_share, config.warmstart.seed)
    assert probe == [] and ids(rollout) == ids(train)
