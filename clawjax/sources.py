"""Where the trainer's samples come from: a replay file, the gRPC buffer, or an in-process queue.

Every source follows one protocol, so the trainer's exactly-once bookkeeping is the same for all:
  take(n, timeout_s) -> list[Sample]   up to n samples (fewer only at timeout / shutdown)
  commit(sample_ids)                   their update is in a durable checkpoint: acknowledge
  reject(sample, reason)               never train it: acknowledge it and keep it on disk
  keepalive()                          keep the leases of taken, uncommitted samples alive
  release(samples)                     never trained (a stop mid-step): deliver them again
  state() / restore(state)             the position to checkpoint (replay only)
  close()
and says whether samples taken but never committed come back after a crash (`redelivers`):
only then must the trainer skip the ones a restored checkpoint already holds; and whether it
starts over after its last sample (`loops`: the replay file), so that one step's samples
could repeat.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from typing import Iterable

from clawjax.config import ConfigError
from clawjax.durable import fsync_dir
from clawjax.sample import Sample, SampleError, require_rollout_logp

log = logging.getLogger("clawjax.sources")


class ReplayError(ValueError):
    """A replay file line is malformed; names the file, the line, the sample and the field."""


def read_replay(path: str, vocab_size: int | None = None, key: str = "replay") -> list[Sample]:
    """Reads and validates every line of a JSONL replay file (one Sample per line, each
    `sample_id` on one line only: samples are tracked by id). `key`: the config key that named
    the file, in the error for a missing one."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key} = {path!r}: no such file")
    samples = []
    lines: dict[str, int] = {}  # sample id -> the line that holds it
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReplayError(f"{path}:{number}: not a JSON object ({e.msg})") from e
            if not isinstance(data, dict):
                raise ReplayError(f"{path}:{number}: expected a JSON object, got {type(data).__name__}")
            try:
                sample = Sample.from_json_dict(data).validate(vocab_size=vocab_size)
            except SampleError as e:
                raise ReplayError(f"{path}:{number}: {e}") from e
            first = lines.setdefault(sample.sample_id, number)
            if first != number:
                raise ReplayError(
                    f"{path}:{number}: sample_id {sample.sample_id!r} is the id of line {first} "
                    "too, expected each id once (the trainer tracks samples by id)")
            samples.append(sample)
    if not samples:
        raise ReplayError(f"{path}: no samples")
    return samples


def write_replay(path: str, samples: Iterable[Sample]) -> None:
    """One JSON line per sample. Refuses (`SampleError`, before writing) a sample without
    `rollout_logp`: `read_replay` would refuse its line."""
    samples = list(samples)
    for s in samples:
        require_rollout_logp(s, "in a replay file")
    with open(path, "w") as f:
        for s in samples:
            f.write(s.to_json() + "\n")


def replay_wrapped_error(path: str, admissible: int, want: int) -> ConfigError:
    """The error for a replay file that started over before one step found `want`
    (`trainer.samples_per_step`) samples the trainer admits: only `admissible` were, in a whole
    pass; the next would be one already in hand (trained twice in one step)."""
    return ConfigError(
        "replay", path,
        f"a file with at least trainer.samples_per_step = {want} samples the trainer admits: "
        f"one pass over it found {admissible} admissible samples (the others were rejected: "
        "too long for trainer.token_budget, invalid or stale; see the warnings and the "
        "dropped_* metrics), so one step would take a sample twice")


def replay_fingerprint(samples: list[Sample]) -> str:
    """A short digest of the sample ids of a replay file, in file order: two files with the
    same ids in the same order (whatever else changed) give the same stream positions."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(s.sample_id.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()[:16]


def checked_replay_state(state: dict, path: str, size: int,
                         fingerprint: str | None = None) -> tuple[int, list[int]]:
    """`(position, released)` of a checkpointed `ReplaySource.state()` (or a merged process
    state), checked against the replay file now given, of `size` samples: `position` an integer
    ≥ 0 (the stream position, any number of passes), `released` a list of file indices in
    [0, size). Raises `ConfigError` (`replay`) naming the file and what was expected: an index
    past the end means the checkpoint was saved with a longer file, whose samples these indices
    name; going on would train other samples than the ones given back (or fail on indexing).

    A state that records the file's sample count (`file_samples`) must match `size`: the
    position alone counts across passes, so a shorter or longer file would go on at another
    sample without any index past its end. With `fingerprint` (`replay_fingerprint` of the file
    now given), a recorded `file_ids_sha256` must match it too (same count, other samples or
    another order). States without these keys (saved before they were recorded) skip the
    checks."""
    position, released = state.get("position", 0), state.get("released", [])
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise ConfigError("replay", path, f"a checkpoint whose replay source state has an "
                          f"integer position ≥ 0; it has position {position!r}")
    if not isinstance(released, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in released):
        raise ConfigError("replay", path, f"a checkpoint whose replay source state lists "
                          f"released file indices as integers; it has released {released!r}")
    outside = [i for i in released if not 0 <= i < size]
    if outside:
        worst = max(outside) if max(outside) >= size else min(outside)
        raise ConfigError(
            "replay", path,
            f"the replay file the checkpoint was saved with: its source state (position "
            f"{position}, released {released}) names sample index {worst}, but the file "
            f"holds {size} samples (expected indices 0 … {size - 1}; a longer file, or another "
            "one). Resume with the checkpoint's replay file, or start a new run in another "
            "workdir")
    recorded = state.get("file_samples")
    if recorded is not None:
        if isinstance(recorded, bool) or not isinstance(recorded, int) or recorded < 1:
            raise ConfigError("replay", path, f"a checkpoint whose replay source state records "
                              f"the file's sample count as an integer ≥ 1; it has file_samples "
                              f"{recorded!r}")
        if recorded != size:
            raise ConfigError(
                "replay", path,
                f"the replay file the checkpoint was saved with: its source state (position "
                f"{position}) records a file of {recorded} samples, but {path} now holds "
                f"{size} samples (a {'shorter' if size < recorded else 'longer'} file, or "
                "another one: the position would go on at other samples). Resume with the "
                "checkpoint's replay file, or start a new run in another workdir")
    digest = state.get("file_ids_sha256")
    if fingerprint is not None and digest is not None and digest != fingerprint:
        raise ConfigError(
            "replay", path,
            f"the replay file the checkpoint was saved with: its source state records sample "
            f"ids digest {digest!r}, but the {size} samples of {path} give {fingerprint!r} "
            "(other samples, or the same in another order: the position would go on at other "
            "samples). Resume with the checkpoint's replay file, or start a new run in another "
            "workdir")
    return position, list(released)


def append_durably(path: str, line: str) -> None:
    """Appends `line` to `path` and returns once it is on disk: the file is flushed and fsynced,
    and when this created it, its directory is fsynced as well (else the new file's name could
    be lost in a crash, with the line)."""
    created = not os.path.exists(path)
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    if created:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


class ReplaySource:
    """Samples of a JSONL file in order, looping when it runs out; the position is checkpointed.

    Invariant: the samples still to deliver are `released` (file indices given back untrained
    by `release`, in the order they were taken) then the file from `position` on; both are in
    `state()`, so a checkpoint never records a released sample as consumed. `state()` also
    records the file's sample count and ids digest, so `restore` refuses another file."""

    redelivers = False
    loops = True

    def __init__(self, path: str, vocab_size: int | None = None):
        self.path = path
        self.samples = read_replay(path, vocab_size)
        self.fingerprint = replay_fingerprint(self.samples)
        self.position = 0
        self.released: list[int] = []

    def take(self, n: int, timeout_s: float = 0.0) -> list[Sample]:
        again, self.released = self.released[:n], self.released[n:]
        out = [self.samples[i] for i in again]
        fresh = n - len(again)
        out += [self.samples[(self.position + i) % len(self.samples)] for i in range(fresh)]
        self.position += fresh
        return out

    def release(self, samples: list[Sample]) -> None:
        """Gives back samples of the last `len(self.samples)` positions taken, never trained:
        they are delivered first again (also after a restart from a checkpoint saved now)."""
        n = len(self.samples)
        recent = {self.samples[p % n].sample_id: p % n
                  for p in range(max(0, self.position - n), self.position)}
        self.released = [recent[s.sample_id] for s in samples] + self.released

    def commit(self, sample_ids) -> None:
        pass

    def reject(self, sample: Sample, reason: str) -> None:
        pass

    def keepalive(self) -> None:
        pass

    def state(self) -> dict:
        state = {"position": self.position}
        if self.released:
            state["released"] = list(self.released)
        state["file_samples"] = len(self.samples)
        state["file_ids_sha256"] = self.fingerprint
        return state

    def restore(self, state: dict) -> None:
        """Goes on from a checkpointed `state()`; raises `ConfigError` (`replay`) when it cannot
        be this file's (`checked_replay_state`)."""
        self.position, self.released = checked_replay_state(
            state, self.path, len(self.samples), self.fingerprint)

    def close(self) -> None:
        pass


class QueueSource:
    """An in-process queue that a rollout loop in the same process feeds with `put`. Samples
    given back by `release` are taken first, before the queue (lost with the process, as the
    queue is). A put is idempotent by `sample_id`, as the buffer's push: an id put before (a
    retried put) is ignored and counted in `duplicates`, so it is trained once; the ids are
    kept for the process's lifetime (about 100 bytes each)."""

    redelivers = False
    loops = False

    def __init__(self, maxsize: int = 0):
        self._queue: queue.Queue[Sample] = queue.Queue(maxsize)
        self._released: list[Sample] = []
        self._closed = threading.Event()
        self._put_ids: set[str] = set()
        self._put_lock = threading.Lock()
        self.duplicates = 0

    def put(self, samples: Iterable[Sample]) -> None:
        for s in samples:
            with self._put_lock:
                if s.sample_id in self._put_ids:
                    self.duplicates += 1
                    continue
                self._put_ids.add(s.sample_id)
            self._queue.put(s)

    def take(self, n: int, timeout_s: float = 60.0) -> list[Sample]:
        """Up to n samples: those given back first, then the queue's, waiting up to `timeout_s`
        for more (0: none, but the samples already queued are taken)."""
        out, self._released = self._released[:n], self._released[n:]
        deadline = time.monotonic() + timeout_s
        while len(out) < n and not self._closed.is_set():
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    out.append(self._queue.get_nowait())
                else:
                    out.append(self._queue.get(timeout=min(remaining, 0.1)))
            except queue.Empty:
                if remaining <= 0:
                    break
        return out

    def commit(self, sample_ids) -> None:
        pass

    def reject(self, sample: Sample, reason: str) -> None:
        pass

    def keepalive(self) -> None:
        pass

    def release(self, samples: list[Sample]) -> None:
        self._released = list(samples) + self._released

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass

    def close(self) -> None:
        self._closed.set()


class BufferSource:
    """Leases from the gRPC rollout buffer; acknowledges only on `commit` (after a checkpoint).

    A `LeaseKeeper` thread extends the leases of taken, uncommitted samples every
    `keepalive_s`, so a slow step or checkpoint never lets the buffer redeliver them. After a
    crash the buffer makes every unacknowledged sample deliverable again.

    An outage of the buffer (unreachable past the client's `retry_budget_s` of retries) is, to
    the trainer, a wait for samples: `take` returns what it has (maybe nothing) and logs it, so
    the loop checks for a stop and asks again; an announcement of the policy version that does
    not get through is logged (the next step announces again). Acknowledgements that do not get
    through stay pending (`ack_pending`): retried at each `take` and `commit`, and a sample the
    buffer redelivers meanwhile (a restart forgets leases) is acknowledged again, never handed
    out: its update is in a checkpoint already, whose meta lists it for a resume as well.
    Permanent refusals (a rotated token: `AuthenticationError`) still raise from `take`.
    """

    redelivers = True
    loops = False

    def __init__(self, address: str, token: str | None = None, tls_ca: str | None = None,
                 rejected_path: str | None = None, keepalive_s: float = 5.0,
                 retry_budget_s: float = 120.0):
        from clawjax.buffer import BufferClient, LeaseKeeper

        self.client = BufferClient(address, token=token, tls_ca=tls_ca,
                                   retry_budget_s=retry_budget_s)
        self._keeper = LeaseKeeper(self.client, interval_s=keepalive_s)
        self._rejected_path = rejected_path
        self.ack_pending: set[str] = set()  # committed; the buffer has not confirmed the ack
        self._down_since: float | None = None  # when the current outage was first seen

    def take(self, n: int, timeout_s: float = 60.0) -> list[Sample]:
        """Up to n leased samples, waiting up to `timeout_s` for them (0: none, but the samples
        the buffer holds queued are leased); fewer, maybe none, while the buffer is down. The
        pending acks go first; when the buffer cannot be reached for them, no lease is tried
        (one retry budget per take while it is down, not two)."""
        from clawjax.buffer import BufferUnavailableError

        unreachable = self._flush_acks()
        if isinstance(unreachable, BufferUnavailableError):
            self._outage(unreachable)
            return []
        out: list[Sample] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < n:
            remaining = deadline - time.monotonic()
            try:
                got = self.client.lease(n - len(out), timeout_s=min(max(remaining, 0.0), 1.0))
            except BufferUnavailableError as e:
                self._outage(e)
                break
            if self._down_since is not None:
                log.warning("the buffer at %s is back after %.0f s", self.client.address,
                            time.monotonic() - self._down_since)
                self._down_since = None
            done = [s.sample_id for s in got if s.sample_id in self.ack_pending]
            if done:  # redelivered after a restart: trained and checkpointed already
                self._flush_acks()
                got = [s for s in got if s.sample_id not in done]
            self._keeper.add(s.sample_id for s in got)
            out.extend(got)
            if remaining <= 0 and not got:
                break
        return out

    def _outage(self, error) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        log.warning("the buffer at %s is unreachable (for %.0f s; the trainer waits for it): %s",
                    self.client.address, now - self._down_since, error)

    def commit(self, sample_ids) -> None:
        ids = list(sample_ids)
        self._keeper.remove(ids)
        self.ack_pending.update(ids)
        self._flush_acks()

    def _flush_acks(self):
        """Acknowledges the pending ids; if the buffer cannot be reached (or refuses), they
        stay pending, logged, and the error is returned (else None)."""
        from clawjax.buffer import RolloutBufferError

        if not self.ack_pending:
            return None
        ids = sorted(self.ack_pending)
        try:
            self.client.ack(ids)
        except RolloutBufferError as e:
            log.warning("%d trained samples are checkpointed but not acknowledged yet (%s): "
                        "retried at the next take or commit", len(ids), e)
            return e
        self.ack_pending.difference_update(ids)
        return None

    def reject(self, sample: Sample, reason: str) -> None:
        """Records `sample` in the rejected file, durably (flushed and fsynced, the directory
        too when the file is new), and only then acknowledges it: the buffer forgets an
        acknowledged sample, so the record is all that is left of it. Acknowledged at once, so
        that drops never hold buffer capacity; the drop counts become durable with the next
        checkpoint, so a crash before it loses the counts since the last one (not the records)."""
        if self._rejected_path:
            append_durably(self._rejected_path,
                           json.dumps({"reason": reason, "sample": sample.to_json_dict()}) + "\n")
        self.commit([sample.sample_id])

    def keepalive(self) -> None:
        pass  # the LeaseKeeper thread does it

    def release(self, samples: list[Sample]) -> None:
        """Ends the leases of samples never trained (no more keep-alive) and asks the buffer
        to requeue them now; if it cannot be reached, their leases expire instead."""
        from clawjax.buffer import RolloutBufferError

        ids = [s.sample_id for s in samples]
        self._keeper.remove(ids)
        if not ids:
            return
        try:
            self.client.nack(ids)
        except RolloutBufferError as e:
            log.warning("could not requeue %d untrained samples (%s): the buffer redelivers "
                        "them when their leases expire", len(ids), e)

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass

    def set_policy_version(self, version: int) -> None:
        from clawjax.buffer import RolloutBufferError

        try:
            self.client.set_policy_version(version)
        except RolloutBufferError as e:
            log.warning("could not announce policy version %d to the buffer (%s): the next "
                        "step announces again", version, e)

    def close(self) -> None:
        """Pending acknowledgements are not waited for: the newest checkpoint's meta lists them
        (`TrainLoop.save_checkpoint` adds `ack_pending`), and a resume acknowledges them first."""
        self._keeper.close()
        self.client.close()
