"""Orbax checkpoints of the train state: save (async), commit callbacks, restore, resume.

A checkpoint at `directory/<step>/` holds two items:
  state — the array pytree (params, optimizer state, step, RNG), restored with the shardings of
          an abstract target so every array lands directly on its devices;
  meta  — a JSON dict (data-source position, policy version, sample ids whose update is in this
          checkpoint but which are not yet acknowledged to the buffer).

Saving is asynchronous: `save` returns once the arrays are copied off the devices and the write
continues in the background. The trainer acknowledges samples only once the checkpoint holding
their update is committed, so `save(..., on_commit=fn)` runs `fn` from a later `poll()` (or
`wait()`) once orbax reports the save finished — never before.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the expected state."""


class _KeepProtected:
    """An orbax preservation policy: keeps the checkpoints of `owner.protected_steps`."""

    def __init__(self, owner: "Checkpointer"):
        self.owner = owner

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        protected = self.owner.protected_steps
        return [info.step in protected for info in checkpoints]


class Checkpointer:
    """Wraps an orbax `CheckpointManager` over `directory` keeping the newest `keep` steps,
    and also the steps `protect(steps)` names (the regression gate's rollback target and the
    candidates it has yet to decide on), however old they get."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep = {keep!r}, expected an integer ≥ 1")
        self.directory = os.path.abspath(directory)
        self.protected_steps: frozenset[int] = frozenset()
        preserve = cm.AnyPreservationPolicy([cm.preservation_policy.LatestN(keep),
                                             _KeepProtected(self)])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preserve, create=True, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta"))
        self._pending: list[Callable[[], None]] = []

    def protect(self, steps) -> None:
        """Keeps the checkpoints of `steps` (an iterable of ints) through later saves; steps
        protected before and not named now are pruned like any other from the next save on.
        Safe to call from any thread (one attribute is replaced)."""
        self.protected_steps = frozenset(int(s) for s in steps)

    # ------------------------------------------------------------------ saving
    def save(self, step: int, state: Any, meta: dict, on_commit: Callable[[], None] | None = None):
        """Starts saving `state` (array pytree) and `meta` (JSON dict) as `step`.

        `on_commit` runs after the checkpoint is durable, from `poll()` or `wait()`.
        """
        self._run_committed()  # orbax finishes the previous save before starting this one
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        if on_commit is not None:
            self._pending.append(on_commit)

    def poll(self) -> int:
        """Runs the commit callbacks of saves that have finished; returns how many ran."""
        if self._pending and not self._manager.is_saving_in_progress():
            return self._run_committed()
        return 0

    def wait(self) -> None:
        """Blocks until every started save is durable, then runs their commit callbacks."""
        self._manager.wait_until_finished()
        self._run_committed()

    def _run_committed(self) -> int:
        if not self._pending:
            return 0
        self._manager.wait_until_finished()
        self._manager.check_for_errors()
        callbacks, self._pending = self._pending, []
        for fn in callbacks:
            fn()
        return len(callbacks)

    # ------------------------------------------------------------------ restoring
    def latest_step(self) -> int | None:
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return list(self._manager.all_steps())

    def discard_after(self, step: int) -> list[int]:
        """Deletes the checkpoints newer than `step` (an abandoned trajectory after a rollback:
        a restart must not resume from it, and training again to those step numbers must be
        able to save them), once any save in flight is durable. Returns the deleted steps."""
        self.wait()
        gone = [s for s in self.all_steps() if s > step]
        for s in gone:
            self._manager.delete(s)
        return gone

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restores `(state, meta, step)`; `step=None` takes the latest.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with `.sharding`) shaped like the
        saved state. Raises `CheckpointError` when there is no checkpoint or it cannot be read.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(
                    f"trainer.resume=True but no checkpoint exists under {self.directory!r}")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for unreadable/corrupt data
            raise CheckpointError(
                f"checkpoint step {step} under {self.directory!r} cannot be restored: "
                f"{type(e).__name__}: {e}") from e
        return restored["state"], dict(restored["meta"]), step

    def close(self) -> None:
        self.wait()
        self._manager.close()
