"""Orbax checkpoints of the train state: save (async), commit callbacks, restore, resume.

A checkpoint at `directory/<step>/` holds two items:
  state — the array pytree (params, optimizer state, step, RNG), restored with the shardings of
          an abstract target so every array lands directly on its devices;
  meta  — a JSON dict (data-source position, policy version, sample ids whose update is in this
          checkpoint but which are not yet acknowledged to the buffer, and what the state was
          built for: the model config and parameter dtype, checked on restore: `expect`).

Beside the steps, `directory/gate.json` records the regression gate's decisions
(`record_gate`): the last accepted step, its probe score, a refused candidate not yet rolled
back, and the run's refusal count. A resume reads it (`gate_record`) so that it never starts
from a candidate the gate refused or has not decided on as if it had been accepted.

Saving is asynchronous: `save` returns once the arrays are copied off the devices and the write
continues in the background. The trainer acknowledges samples only once the checkpoint holding
their update is committed, so `save(..., on_commit=fn)` runs `fn` from a later `poll()` (or
`wait()`) once orbax reports the save finished — never before.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from clawjax.durable import fsync_dir

log = logging.getLogger(__name__)
GATE_RECORD = "gate.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the expected state."""


class _KeepProtected:
    """An orbax preservation policy: keeps the checkpoints of `owner.protected_steps` and the
    newest checkpoint at or below `owner.protected_floor` (None: no such one)."""

    def __init__(self, owner: "Checkpointer"):
        self.owner = owner

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        protected, floor = self.owner.protected_steps, self.owner.protected_floor
        below = [info.step for info in checkpoints if floor is not None and info.step <= floor]
        if below:
            protected = protected | {max(below)}
        return [info.step in protected for info in checkpoints]


def _differences(key: str, saved: Any, expected: Any) -> list[str]:
    """`"key.field = saved in the checkpoint, expected now"` for each field where `saved`
    differs from `expected` (JSON values; dicts are compared field by field, and a field the
    saved dict lacks, written by an older version, is not compared)."""
    expected = json.loads(json.dumps(expected))  # the form the checkpoint's meta has
    if isinstance(saved, dict) and isinstance(expected, dict):
        return [line for field in sorted(saved)
                for line in _differences(f"{key}.{field}", saved[field], expected.get(field))]
    if saved == expected:
        return []
    return [f"{key} = {saved!r} in the checkpoint, {expected!r} now"]


def _write_json_durably(path: str, obj: Any) -> None:
    """Replaces `path` by `obj` as JSON atomically (a temporary file, fsynced, renamed over it,
    the directory fsynced): a crash leaves the old content or the new, never a mix."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)


class Checkpointer:
    """Wraps an orbax `CheckpointManager` over `directory` keeping the newest `keep` steps,
    and also what `protect` names (the regression gate's rollback target, the candidates it has
    yet to decide on, the newest checkpoint at or below its accepted step), however old."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep = {keep!r}, expected an integer ≥ 1")
        self.directory = os.path.abspath(directory)
        self.protected_steps: frozenset[int] = frozenset()
        self.protected_floor: int | None = None
        preserve = cm.AnyPreservationPolicy([cm.preservation_policy.LatestN(keep),
                                             _KeepProtected(self)])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preserve, create=True, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta"))
        self._pending: list[Callable[[], None]] = []

    def protect(self, steps, at_or_below: int | None = None) -> None:
        """Keeps the checkpoints of `steps` (an iterable of ints), and the newest checkpoint at
        or below `at_or_below` when given, through later saves; steps protected before and not
        named now are pruned like any other from the next save on. Safe to call from any thread
        (attributes are replaced, never mutated)."""
        self.protected_floor = None if at_or_below is None else int(at_or_below)
        self.protected_steps = frozenset(int(s) for s in steps)

    # ------------------------------------------------------------------ gate record
    def record_gate(self, accepted_step: int, serving_score: float,
                    refused_step: int | None = None, after_rollback: dict | None = None,
                    refusals: int = 0) -> None:
        """Durably records the regression gate's state (`directory/gate.json`, replaced
        atomically; written by process 0 only, the one that writes the checkpoints): the last
        accepted step and its probe score, a refused candidate (None once rolled back),
        `after_rollback` (a JSON dict, kept only when given): what a resume must go on with
        after the last rollback until a newer checkpoint holds it, and `refusals`, the run's
        refusals so far (a resume goes on counting from it)."""
        if jax.process_index() != 0:
            return
        record = {"accepted_step": int(accepted_step), "serving_score": float(serving_score),
                  "refused_step": None if refused_step is None else int(refused_step),
                  "refusals": int(refusals)}
        if after_rollback is not None:
            record["after_rollback"] = after_rollback
        _write_json_durably(os.path.join(self.directory, GATE_RECORD), record)

    def gate_record(self) -> dict | None:
        """The last `record_gate` (a dict of its arguments), or None when there is none (the
        gate was off, or the checkpoints predate the record). Raises `CheckpointError` on an
        unreadable record."""
        path = os.path.join(self.directory, GATE_RECORD)
        try:
            with open(path) as f:
                record = json.load(f)
            int(record["accepted_step"]), float(record["serving_score"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{path} cannot be read: {type(e).__name__}: {e} (expected the JSON object "
                "record_gate writes: accepted_step, serving_score, refused_step, refusals, and "
                "maybe after_rollback)") from e
        return record

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
        self._wait_durable()
        self._run_committed()

    def _wait_durable(self) -> None:
        """Waits for the save in flight; if it failed, raises its error and drops its commit
        callbacks: that checkpoint never became durable, so they (which acknowledge samples)
        must never run. orbax reports an error once, so a later wait (`close` after the
        error) would otherwise run them."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception:  # the save's error (an interrupt of the wait is not one)
            self._pending = []
            raise

    def _run_committed(self) -> int:
        if not self._pending:
            return 0
        self._wait_durable()
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
        able to save them), once any save in flight is durable. Returns the deleted steps.

        With several processes a collective: orbax's delete syncs the processes once per step
        and only process 0 deletes, so every process must delete the same steps. Each lists
        them before any is deleted (a process listing after process 0 deleted one would sync
        once less: a hang, or orbax's "sync_global_devices name mismatch"); listings that
        differ raise `CheckpointError` on every process alike."""
        self.wait()
        several = jax.process_count() > 1
        if several:
            from jax.experimental import multihost_utils

            # Process 0 commits each save: every process's wait is over before any lists.
            multihost_utils.sync_global_devices("clawjax.checkpoint.discard_after.wait")
        gone = [s for s in self.all_steps() if s > step]
        if several:
            from clawjax.distributed import gather_json

            listed = gather_json(gone)
            if any(part != listed[0] for part in listed):
                raise CheckpointError(
                    f"the processes list different checkpoints newer than step {step} under "
                    f"{self.directory!r} to delete: {listed} (in process order; expected one "
                    "directory every process sees alike)")
        for s in gone:
            self._manager.delete(s)
        return gone

    def restore_meta(self, step: int) -> dict:
        """The meta of checkpoint `step`, without its arrays. Raises `CheckpointError` when it
        cannot be read."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for unreadable/corrupt data
            raise CheckpointError(
                f"checkpoint step {step} under {self.directory!r} cannot be restored: "
                f"{type(e).__name__}: {e}") from e
        return dict(restored["meta"])

    def check_meta(self, step: int, meta: dict, expect: dict) -> None:
        """Raises `CheckpointError` naming every field where `meta` (checkpoint `step`'s)
        differs from `expect` (meta key -> the value this run saves). A key the checkpoint
        lacks (saved before it was recorded) is not checked, and logged."""
        differences = []
        for key, expected in expect.items():
            if key not in meta:
                log.info("checkpoint step %d has no %r in its meta (saved before it was "
                         "recorded): not checked", step, key)
                continue
            differences += _differences(key, meta[key], expected)
        if differences:
            raise CheckpointError(
                f"checkpoint step {step} under {self.directory!r} was saved for another model: "
                + "; ".join(differences) + " (expected the model config and dtype it was "
                "saved with: resume with that config, or start a new run in another workdir)")

    def restore(self, abstract_state: Any, step: int | None = None,
                expect: dict | None = None) -> tuple[Any, dict, int]:
        """Restores `(state, meta, step)`; `step=None` takes the latest.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with `.sharding`) shaped like the
        saved state. `expect` (meta key -> value, e.g. the model config) is checked against the
        checkpoint's meta before any array is read (`check_meta`): orbax would otherwise cast a
        state saved for another model into this one. Raises `CheckpointError` when there is no
        checkpoint, it cannot be read, or it does not match `expect`.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(
                    f"trainer.resume=True but no checkpoint exists under {self.directory!r}")
        if expect:
            self.check_meta(step, self.restore_meta(step), expect)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for unreadable/corrupt data
            raise CheckpointError(
                f"checkpoint step {step} under {self.directory!r} cannot be restored: "
                f"{type(e).__name__}: {e}") from e
        return restored["state"], dict(restored["meta"]), step

    def close(self) -> None:
        """Waits for the save in flight (running its commit callbacks once durable) and closes
        orbax's manager, always: a save that failed still raises its error here, after the
        manager's threads and handles are released."""
        try:
            self.wait()
        finally:
            self._manager.close()
