"""The regression gate's side of `TrainLoop` (`GateMixin`): deciding each candidate before it is
published, rolling back on a refusal, and keeping what a resume needs to decide again.

A candidate is the train state at a publish step. The gate scores it on the probe set against
the serving policy (`clawjax.gate.RegressionGate`); passed, it is published and becomes the
rollback target; refused, the trainer goes back to the last accepted state. With
`gate.background` the publisher thread scores while the trainer trains on, and the trainer acts
on a refusal at its next step boundary (`settle_gate`).

Durability: a candidate is checkpointed before the gate decides on it, and each decision is
recorded (`Checkpointer.record_gate`: the last accepted step and its probe score, a refusal not
yet rolled back). A resume never takes a refused or undecided checkpoint as the accepted policy:
one newer than the last accepted step is decided first (`_resume_gated`), and a refusal rolls
back as at run time. The checkpoints a rollback or a resume needs are protected from
`checkpoint.keep`'s pruning (`_protect_checkpoints`). A rollback deletes the checkpoints newer
than the accepted step, which held how far the data source had gone; until a newer checkpoint
holds it again, the record keeps it (`after_rollback`), so a crash in between resumes past the
discarded samples as the run went on (`_resume_after_rollback`).
"""

from __future__ import annotations

import logging
import threading
import time

import jax

from clawjax import checkpoint as ckpt_lib
from clawjax import config as config_lib
from clawjax import distributed as dist_lib
from clawjax import sources
from clawjax import trained_log

log = logging.getLogger("clawjax.train")


def make_gate(config, graphdef, vocab_size: int):
    """The regression gate over `gate.probe` (a replay-format JSONL of probe samples)."""
    from clawjax.gate import RegressionGate

    if not config.gate.probe:
        raise config_lib.ConfigError("gate.probe", config.gate.probe,
                                     "a JSONL file of probe samples when gate.enabled")
    probe = sources.read_replay(config.gate.probe, vocab_size=vocab_size, key="gate.probe")
    return RegressionGate(graphdef, probe, config.gate.margin, config.trainer.token_budget,
                          chunk=config.loss.logp_chunk)


def _device_copy(tree):
    """A copy of every array of `tree` in new buffers on the same devices: it survives the
    train step donating the originals (the gate's candidate and rollback target)."""
    return jax.tree.map(lambda x: x.copy(), tree)


class GateMixin:
    """The gate's state and decisions, mixed into `TrainLoop` (which owns `state`, `step`,
    `checkpointer`, `publisher`, `publish_now`, `save_checkpoint`, `restore` and
    `_load_state`). Without a gate (`self.gate` None) only `maybe_publish`'s plain publishing
    is left."""

    def _init_gate(self, config, gate) -> None:
        """The gate (`gate`, else the config's when `gate.enabled`, else None) and its decision
        state; before the resume, which may decide a candidate (`_resume_gated`)."""
        self.gate = gate
        if self.gate is None and config.gate.enabled:
            self.gate = make_gate(config, self.graphdef, self.model_config.vocab_size)
        self.gate_refusals = 0
        self._record_lock = threading.Lock()  # one gate record written at a time
        self._recorded_refused: int | None = None  # the refused step the record holds
        # What the run goes on with after the last rollback (`_carry_on_after_rollback`),
        # recorded until a checkpoint started after that rollback is durable.
        self._rollback_carry: dict | None = None
        self._good_step = 0  # the step of the newest state the regression gate accepted
        self._good_state = None  # gate.rollback "memory": that state (a copy on device)
        self._undecided: set[int] = set()  # "checkpoint": candidates saved, not yet decided
        # gate.background: the publisher thread decides; the trainer thread acts on a refusal at
        # its next step boundary (`settle_gate`). The lock guards the decision state: the
        # epoch (bumped by each background rollback: a candidate of an older epoch descends
        # from a refused one and is void), a refusal not yet acted on, and _good_step /
        # _good_state while the publisher thread promotes an accepted candidate.
        self.gate_in_background = bool(config.gate.background) and jax.process_count() == 1
        self._gate_lock = threading.Lock()
        self._gate_epoch = 0
        self._gate_refused = None  # (GateDecision, candidate step)
        self._gate_score_s = 0.0  # scoring the last decided candidate (either thread)

    def _start_gate(self, score: float | None) -> None:
        """After the resume (or at a fresh start): the current state is the serving policy,
        accepted with probe `score` (None: scored now), saved, kept and recorded."""
        if self.gate is None:
            return
        self.gate.accept(self.state.params, score)
        self.save_checkpoint()  # no-op when resuming: that step is already saved
        self._keep_good_state()
        self._record_gate()

    def _resume_gated(self, latest: int, record: dict) -> float | None:
        """The latest checkpoint is newer than the last accepted step: a candidate saved before
        the gate decided (or a step trained after one). A refusal recorded for a step up to it
        stands; otherwise the gate decides now, against the recorded serving score. Passed: it
        is resumed from. Refused: a rollback as at run time (`rollback`): the train state of
        the newest checkpoint at or below the accepted step, the newer ones deleted, while the
        data source, the ids to acknowledge and the drop counts go on from the latest."""
        accepted, refused = record["accepted_step"], record.get("refused_step")
        self.restore(latest)
        if refused is not None and accepted < refused <= latest:
            verdict = f"the regression gate refused step {refused} before the restart"
            # counted when it was recorded (`gate_refusals`)
        else:
            refused = latest
            self.gate.accept(None, record["serving_score"])  # the score of the served policy
            decision = self.gate.check(self.state.params)
            if decision.passed:
                log.info("%s for checkpoint step %d (newer than the last accepted step %d): "
                         "resuming from it", decision.describe(), latest, accepted)
                return decision.candidate
            verdict = f"{decision.describe()} for checkpoint step {latest}"
            self.gate_refusals += 1
        target = max((s for s in self.checkpointer.all_steps() if s <= accepted), default=None)
        if target is None:
            raise ckpt_lib.CheckpointError(
                f"{verdict}, but no checkpoint at or below the last accepted step {accepted} "
                f"is left under {self.checkpointer.directory!r} to roll back to (expected the "
                "one kept for the gate)")
        log.warning("%s: rolling back to checkpoint step %d (deleting steps %s)", verdict,
                    target, [s for s in self.checkpointer.all_steps() if s > target])
        self._load_state(target)
        self._carry_on_after_rollback(target)
        # Before the deletion: the carry, and the refused step until it is gone (a crash in
        # between resumes into the "refused before the restart" branch: counted once).
        with self._record_lock:
            self._write_gate_record(accepted, record["serving_score"], refused)
        self.checkpointer.discard_after(target)
        with self._record_lock:
            self._write_gate_record(accepted, record["serving_score"], None)
        trained_log.truncate(self._trained_log, target)
        return None

    def _settle_last_candidate(self) -> bool:
        """Waits for a background gate's pending decision; True if it rolled back."""
        if not self.gate_in_background or self.gate is None or self.publisher is None:
            return False
        self.publisher.wait()
        return self.settle_gate()

    def maybe_publish(self) -> None:
        """Publishes every `publish.every_steps` steps, behind the regression gate: a candidate
        scoring worse than the serving policy by more than `gate.margin` is not published and
        the trainer rolls back to the last published (good) state (`rollback`). With
        `gate.background` the publisher thread scores the candidate while the trainer trains
        on, and the rollback happens at the trainer's next step boundary (`settle_gate`)."""
        if self.publisher is None or self.step % self.config.publish.every_steps:
            return
        check = on_drop = None
        if self.gate is not None and self.gate_in_background:
            check, on_drop = self._candidate_check()
        elif self.gate is not None:
            scoring = time.perf_counter()
            decision = self.gate.check(self.state.params)
            self._thread_s["gate_s"] = self._gate_score_s = time.perf_counter() - scoring
            if not decision.passed:
                log.warning("%s: rolling back to step %d", decision.describe(),
                            self._good_step)
                self._record_gate(refused=self.step, counted=True)
                self.rollback()
                return
            self.gate.accept(self.state.params, decision.candidate)
            if self.config.gate.rollback == "checkpoint":
                self.save_checkpoint()  # the rollback target for a later refusal
            self._keep_good_state()
            self._record_gate()
        self.publish_now(check=check, on_drop=on_drop)

    def _candidate_check(self):
        """The publisher-thread check of the current state as a candidate (`gate.background`).
        What it needs is taken now, before the next update donates the state's buffers: a copy
        of the parameters to score and, for `gate.rollback` "memory", of the whole state (the
        rollback target if accepted); "checkpoint" saves the candidate now (a refusal's
        rollback discards it). `gate_s` is this trainer-thread part. Returns the publish's
        `(check, on_drop)`."""
        started = time.perf_counter()
        step, epoch = self.step, self._gate_epoch
        if self.config.gate.rollback == "memory":
            candidate = _device_copy(self.state)
            params, on_drop = candidate.params, None
        else:
            candidate, params = None, _device_copy(self.state.params)
            on_drop = self._candidate_dropped(step)
            with self._gate_lock:
                self._undecided.add(step)
            self._protect_checkpoints()
            self.save_checkpoint()

        def check() -> bool:
            scoring = time.perf_counter()
            try:
                decision = self.gate.check(params)
                with self._gate_lock:
                    self._gate_score_s = time.perf_counter() - scoring
                    if epoch != self._gate_epoch or self._gate_refused is not None:
                        return False  # trained on from a refused candidate
                    if not decision.passed:
                        self._gate_refused = (decision, step)
                        self._record_gate(refused=step, counted=True)
                        return False
                    self.gate.accept(params, decision.candidate)
                    self._good_step, self._good_state = step, candidate
                self._record_gate()
                return True
            finally:  # decided, or scoring raised (the publish fails)
                self._no_longer_undecided(step)

        self._thread_s["gate_s"] = time.perf_counter() - started
        return check, on_drop

    def _candidate_dropped(self, step: int):
        """The `on_drop` of candidate `step`'s publish ("checkpoint" mode, background): coalesced
        away by a newer one, it is never decided, so its checkpoint is no longer kept for the
        gate (`checkpoint.keep` prunes it like any other; a resume never takes it as accepted)."""
        return lambda: self._no_longer_undecided(step)

    def _no_longer_undecided(self, step: int) -> None:
        """Candidate `step` is decided, or never will be: its checkpoint is no longer kept for
        the gate as undecided (it still is as the accepted step, if it became that)."""
        with self._gate_lock:
            self._undecided.discard(step)
        self._protect_checkpoints()

    def _record_gate(self, refused: int | None = None, counted: bool = False) -> None:
        """Records the gate's state durably (`Checkpointer.record_gate`), read by a resume: the
        accepted step and the serving score, and `refused`, a candidate refused but not yet
        rolled back; `counted`: that refusal is new, and `gate_refusals` counts it here, under
        the record's lock, so every record holds the count and the refused step together (a
        resume counts a refusal it finds recorded no more). Called from either thread, after
        each decision and each rollback."""
        with self._record_lock:
            self.gate_refusals += int(counted)
            self._recorded_refused = refused
            self._write_gate_record(self._good_step, self.gate.serving_score, refused)

    def _write_gate_record(self, accepted: int, serving_score: float,
                           refused: int | None) -> None:
        """`Checkpointer.record_gate` with this run's rollback carry and refusal count."""
        self.checkpointer.record_gate(accepted, serving_score, refused, self._rollback_carry,
                                      refusals=self.gate_refusals)

    def _carry_on_after_rollback(self, step: int) -> None:
        """Before a rollback to checkpoint `step` deletes the newer ones: what they held that
        the run goes on with (the data source's position, the drop counts, the ids trained and
        not yet acknowledged: every process's), kept to be recorded (`_record_gate`) until a
        checkpoint started after now is durable (`_checkpoint_committed`). A collective with
        several processes, as the rollback is: each takes part."""
        self.checkpointer.wait()  # saves in flight durable: their ids acknowledged
        ids = {i for part in dist_lib.gather_json(list(self.unacked)) for i in part}
        self._rollback_carry = {"step": int(step), "source": self.source.state(),
                                "dropped": dict(self.dropped),
                                "unacked_ids": sorted(ids | set(self.skip_ids))}

    def _checkpoint_committed(self, carry: dict | None) -> None:
        """A checkpoint is durable; `carry` is the rollback carry when its save started. One
        started after the last rollback holds all of that carry, which the record drops."""
        if carry is None or carry is not self._rollback_carry:
            return
        with self._record_lock:
            self._rollback_carry = None
            self._write_gate_record(self._good_step, self.gate.serving_score,
                                    self._recorded_refused)

    def _resume_after_rollback(self, record: dict | None, latest: int | None) -> None:
        """After restoring checkpoint `latest`: when the record's `after_rollback` is newer (no
        checkpoint since the last rollback became durable), the run goes on from it: the data
        source's position and the drop counts as at the rollback, its ids acknowledged."""
        carry = (record or {}).get("after_rollback")
        if not carry or latest is None or latest > int(carry["step"]):
            return
        self.source.restore(carry["source"])
        for reason, count in carry["dropped"].items():
            self.dropped[reason] = int(count)
        ids = sorted(carry["unacked_ids"])
        if ids:
            self.source.commit(ids)
        if self.source.redelivers:
            self.skip_ids |= set(ids)
        self._rollback_carry = carry
        log.info("going on as after the rollback to step %d (the data source past the "
                 "discarded steps' samples; %d samples acknowledged)", carry["step"], len(ids))

    def settle_gate(self) -> bool:
        """Acts on a background gate's refusal, if one came: rolls back to the last accepted
        state (discarding every step trained since it). Returns whether it rolled back. The
        trainer thread calls it at each step boundary; after `publisher.wait()` it settles
        every candidate published so far."""
        with self._gate_lock:
            refused, self._gate_refused = self._gate_refused, None
            if refused is None:
                return False
            self._gate_epoch += 1
        decision, step = refused   # counted when the publisher thread recorded it
        log.warning("%s for step %d: rolling back to step %d", decision.describe(), step,
                    self._good_step)
        self.rollback()
        return True

    def _keep_good_state(self) -> None:
        """The current state becomes the rollback target (`gate.rollback`: its checkpoint,
        already saved, or an on-device copy the train step cannot donate away)."""
        self._good_step = self.step
        if self.config.gate.rollback == "memory":
            self._good_state = _device_copy(self.state)
        self._protect_checkpoints()

    def _protect_checkpoints(self) -> None:
        """Keeps, whatever `checkpoint.keep` prunes, the newest checkpoint at or below the
        accepted step (a resume after a crash rolls back to it: `_resume_gated`) and, for
        `gate.rollback` "checkpoint", the rollback target's checkpoint and those of candidates
        not yet decided (their restore must not find them gone)."""
        with self._gate_lock:
            good, undecided = self._good_step, set(self._undecided)
        steps = {good, *undecided} if self.config.gate.rollback == "checkpoint" else ()
        self.checkpointer.protect(steps, at_or_below=good)

    def rollback(self) -> None:
        """Back to the last state the gate accepted. Checkpoints newer than it are deleted
        (a restart resumes from the good state) and the trained-samples log is cut back to it;
        samples trained since were consumed and their updates are discarded. Only the train
        state goes back, the same for both `gate.rollback` modes: the data source, the ids to
        acknowledge and the drop counts go on (the samples are not trained again), also after
        a crash before the next checkpoint (`_carry_on_after_rollback`). In "memory" mode an
        accepted state not on disk is checkpointed (and waited for) before the deletion, so a
        crash resumes from it."""
        self._carry_on_after_rollback(self._good_step)
        # The carry, recorded before the deletion, with the refused step until it is gone (a
        # crash in between resumes into the "refused before the restart" branch: counted once)
        self._record_gate(refused=self._recorded_refused)
        if self._good_state is not None:
            self.state = _device_copy(self._good_state)
            if self._good_step not in self.checkpointer.all_steps():
                # Durable before the newer checkpoints go: a crash in between must resume
                # from it, not from an older one with the source past the accepted steps'
                # samples (their updates would be lost). It holds the rollback's carry.
                self._saved_step = -1
                self.save_checkpoint()
                self.checkpointer.wait()
            self._saved_step = self._good_step
        self.checkpointer.discard_after(self._good_step)
        with self._gate_lock:
            self._undecided.clear()
        self._protect_checkpoints()
        if self._good_state is None:
            self._load_state(self._good_step)
        self._record_gate()  # the refusal is acted on
        trained_log.truncate(self._trained_log, self._good_step)
