"""Checkpointer: a save's commit callback (which acknowledges samples to the buffer) runs only
once that checkpoint is durable, never for a save that failed."""

from __future__ import annotations

import threading

import jax.numpy as jnp
import pytest

from clawjax.checkpoint import Checkpointer


def test_a_failed_save_never_runs_its_commit_callback(tmp_path):
    """The background write of step 1 fails (its meta cannot be written as JSON): the error
    surfaces, and neither a second `wait` nor `close` (what `TrainLoop.close` does after the
    error) runs step 1's callback, since no checkpoint holds its update. A later good save still
    commits and runs its own."""
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=3)
    committed: list[int] = []
    ckpt.save(1, {"w": jnp.ones(3)}, {"unwritable": object()},
              on_commit=lambda: committed.append(1))
    with pytest.raises(TypeError, match="not JSON serializable"):
        ckpt.wait()
    ckpt.wait()
    assert ckpt.all_steps() == [] and committed == []
    ckpt.save(2, {"w": jnp.ones(3)}, {"ok": True}, on_commit=lambda: committed.append(2))
    ckpt.close()
    assert committed == [2]
    assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [2]


def _orbax_threads(before) -> list[str]:
    """Threads started since `before` (a set of threads) that orbax's manager owns and that only
    `CheckpointManager.close` ends (its metadata store's executor)."""
    return [t.name for t in threading.enumerate()
            if t not in before and t.name.startswith("metadata_store")]


def test_close_after_a_failed_save_still_closes_the_manager(tmp_path):
    """`close` whose final wait raises the failed save's error (what `TrainLoop.close` meets after
    a save that failed in the background) still closes orbax's manager: its threads end, none
    left behind per failed run; the save's error is what `close` raises."""
    before = set(threading.enumerate())
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=3)
    ckpt.save(1, {"w": jnp.ones(3)}, {"unwritable": object()})
    with pytest.raises(TypeError, match="not JSON serializable"):
        ckpt.close()
    assert _orbax_threads(before) == []
