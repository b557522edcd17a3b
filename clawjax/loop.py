"""`TrainLoop`: the trainer's step loop — sources, validation, packing, the jitted step,
checkpoints with exactly-once acknowledgement, metrics, publishing.

Exactly-once: the ids of samples trained since the last checkpoint are stored in the next
checkpoint's meta (`unacked_ids`) and acknowledged to the source once that checkpoint is
committed. On resume, the restored checkpoint's `unacked_ids` are acknowledged first (idempotent)
and skipped if delivered again; samples trained after the checkpoint were never acknowledged, so
the source delivers them again and they are trained from the restored state. `trained.jsonl`
keeps the ids per step of the surviving lineage (`clawjax.trained_log`). Which samples a step
takes is `clawjax.intake`'s decision.

The regression gate's part (deciding candidates, rollback, a gated resume) is `GateMixin`, in
`clawjax.loop_gate`; the model, source and publisher are built by `clawjax.loop_setup`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time

import jax
import numpy as np
from flax import nnx

from clawjax import batch as batch_lib
from clawjax import cli_signals
from clawjax import checkpoint as ckpt_lib
from clawjax import config as config_lib
from clawjax import distributed as dist_lib
from clawjax import group_norm, intake
from clawjax import losses, sharding as sharding_lib, sources, trainer
from clawjax import trained_log
from clawjax import workdir as workdir_lib
from clawjax.loop_gate import GateMixin
from clawjax.loop_setup import build_model, make_publisher, make_source
from clawjax.metrics import MetricsWriter, sample_metrics, sample_stats
from clawjax.sample import Sample

log = logging.getLogger("clawjax.train")

# Row counts a step may compile for: powers of two, large enough that one step is one batch.
ROW_BUCKETS = tuple(2 ** i for i in range(16))


def own_logs() -> tuple[str, ...]:
    """This process's metrics and trained-step logs: file names under the workdir."""
    return tuple(os.path.basename(dist_lib.file_for_process(name))
                 for name in ("metrics.jsonl", "trained.jsonl"))


def _cache_size(jitted) -> int:
    """How many shape signatures `jitted` (a `jax.jit` function) has compiled (0 where this
    JAX does not say)."""
    size = getattr(jitted, "_cache_size", None)
    return int(size()) if callable(size) else 0


class TrainLoop(GateMixin):
    """Owns the train state and drives `trainer.steps` updates from a sample source."""

    def __init__(self, config, source=None, publisher=None, gate=None, extra_metrics=None):
        """`source`, `publisher` (a `clawjax.publish.Publisher`) and `gate` (a
        `clawjax.gate.RegressionGate`) default to what the config describes; `extra_metrics`
        is called once per step and its dict is merged into the step's metrics."""
        config_lib.validate(config)
        config = dist_lib.process_config(config)  # samples_per_step: this process's share
        self.config = config
        self.workdir = os.path.abspath(config.workdir)
        workdir_lib.require_fresh(self.workdir, config.trainer.resume,  # before writing a file
                                  publish_dir=workdir_lib.own_publish_dir(config),
                                  logs=own_logs())
        os.makedirs(self.workdir, exist_ok=True)
        self.mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        model, self.model_config = build_model(config, self.mesh)
        self.graphdef, params = nnx.split(model, nnx.Param)
        self.param_shardings = sharding_lib.param_shardings(model, self.mesh)
        self.loss_config = losses.LossConfig(**config_lib.resolved_loss_kwargs(config))
        self.step_config = trainer.StepConfig(
            loss=self.loss_config, old_logp=config.loss.old_logp,
            logp_chunk=config.loss.logp_chunk,
            use_ref=self.loss_config.kl_coef > 0 or bool(config.loss.report_kl))
        t = config.trainer
        self.optimizer = trainer.make_optimizer(t.lr, t.b1, t.b2, t.weight_decay, t.grad_clip,
                                                float32_master=config.model.dtype != "float32")
        self.state = jax.jit(
            lambda p: trainer.init_state(p, self.optimizer, t.seed))(params)
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self.ref_params = params if self.step_config.use_ref else None
        self.data_parallel = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.local_data_parallel = dist_lib.local_data_parallel(self.mesh)  # this process's
        # Micro-batch stacks are [M, R, L(, K)]: rows split over the data-parallel axes.
        self.stack_sharding = jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
        self._step = jax.jit(
            trainer.make_train_step(self.graphdef, self.optimizer, self.step_config),
            in_shardings=(self.state_shardings, self.stack_sharding,
                          self.param_shardings if self.ref_params is not None else None),
            out_shardings=(self.state_shardings, None),
            donate_argnums=(0,))
        self.source = dist_lib.shard_source(source if source is not None else make_source(
            config, self.model_config.vocab_size, self.workdir))
        self.publisher = publisher if publisher is not None else make_publisher(
            config, self.workdir)
        self.extra_metrics = extra_metrics
        self._init_gate(config, gate)
        self.checkpointer = ckpt_lib.Checkpointer(
            os.path.join(self.workdir, "checkpoints"), keep=config.checkpoint.keep,
            async_save=config.checkpoint.async_save)
        self.dropped = collections.Counter({r: 0 for r in intake.DROP_REASONS})  # zeros shown too
        self._unwritten = None  # (step, metrics) trained, not yet written (`log_step`)
        self.unacked: list[str] = []  # trained since the last checkpoint save started
        self._in_hand: set[str] = set()  # trained by any process, not yet acknowledged
        self.skip_ids: set[str] = set()  # trained and checkpointed, maybe not yet acknowledged
        self._stop = threading.Event()
        self._signals: list[int] = []   # filled by the signal handlers (install_signal_handlers)
        # Where the trainer thread's time goes besides the update (metrics of each step):
        # take_wait_s waiting for this step's samples; after_step_s after the previous update
        # (checkpoint start, regression gate, hand-off to the publisher), gate_s of which
        # scoring the candidate on the probe set (0 when nothing was published).
        self._thread_s = {"take_wait_s": 0.0, "after_step_s": 0.0, "gate_s": 0.0}
        self._saved_step = -1  # the step of the newest checkpoint started by this process
        self._trained_log = dist_lib.file_for_process(os.path.join(self.workdir, "trained.jsonl"))
        score = self._resume() if config.trainer.resume else None
        self._start_gate(score)  # with a gate: the policy we start from is the serving one
        if self.step > 0:
            self._announce_restored()
        # Metrics are global (the loss of the global batch): process 0 writes metrics.jsonl,
        # TensorBoard and the progress bar; others keep their own file (metrics.process{i}).
        lead = jax.process_index() == 0
        self.metrics = MetricsWriter(self.workdir, total_steps=config.trainer.steps,
                                     progress=config.trainer.progress and lead,
                                     filename=os.path.basename(dist_lib.file_for_process(
                                         "metrics.jsonl")), tensorboard=lead)

    # ------------------------------------------------------------------ state
    @property
    def step(self) -> int:
        return int(self.state.step)

    @property
    def policy_version(self) -> int:
        return self.step

    def model(self):
        """The current policy as an `nnx.Module` (shares the train state's arrays)."""
        return nnx.merge(self.graphdef, self.state.params)

    def _model_meta(self) -> dict:
        """What the train state was built for, saved in each checkpoint's meta and checked on
        restore: the model config (its weights' part, not training options such as `remat` or
        `attention`, nor unmodelled config.json keys) and the parameter dtype."""
        fields = dataclasses.asdict(self.model_config)
        for option in ("remat", "attention", "extra"):
            fields.pop(option)
        return {"model_config": fields, "param_dtype": self.config.model.dtype}

    def _load_state(self, step: int | None) -> tuple[dict, int]:
        """Loads checkpoint `step` (None: the latest) into `self.state`, every array on its
        devices; returns its (meta, step). Raises `CheckpointError` if it was saved for another
        model config or dtype."""
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            self.state, self.state_shardings)
        self.state, meta, step = self.checkpointer.restore(abstract, step,
                                                           expect=self._model_meta())
        self._saved_step = step
        return meta, step

    def _resume(self) -> float | None:
        """`trainer.resume`: restores the latest checkpoint, or with the regression gate on one
        the gate accepted (`_resume_gated`). Returns the restored policy's probe score when
        already known (else None)."""
        record = self.checkpointer.gate_record() if self.gate is not None else None
        if record is not None:
            self.gate_refusals = int(record.get("refusals", 0))   # the run's count goes on
        latest = self.checkpointer.latest_step()
        if record is None or latest is None or latest <= record["accepted_step"]:
            if self.gate is not None and record is None:
                log.info("no regression gate record in %s: resuming from the latest "
                         "checkpoint", self.checkpointer.directory)
            self.restore()
            self._resume_after_rollback(record, latest)
            return None
        return self._resume_gated(latest, record)

    def _announce_restored(self) -> None:
        """After a resume: the restored policy is published (`v<step>`, whatever the publish
        cadence) and its version announced to the source. The fleet still serves the version the
        crashed run published last, which may be newer than the restored checkpoint (a policy
        the resumed run never trained, and a number it will publish again); its samples would
        look fresh, and a gate's serving score would be another policy's. Returns at once: the
        publisher writes and updates the fleet in its thread (`publisher.wait` to await it)."""
        if self.publisher is not None:
            self.publish_now()
        if hasattr(self.source, "set_policy_version"):
            self.source.set_policy_version(self.policy_version)

    def publish_now(self, check=None, on_drop=None) -> None:
        """Hands the current policy to the publisher as `v<step>`, off the publish cadence
        (`Publisher.maybe_publish` with `force`; `check` / `on_drop` as there). Returns at once."""
        self.publisher.maybe_publish(self.step, (self.graphdef, self.state.params),
                                     self.model_config, self.policy_version, force=True,
                                     check=check, on_drop=on_drop)

    def restore(self, step: int | None = None) -> None:
        """Resumes from checkpoint `step` (default: the latest): the train state, the data
        source's position, the ids to acknowledge, the drop counts."""
        meta, step = self._load_state(step)
        self.source.restore(meta.get("source", {}))
        checkpointed = sorted(meta.get("unacked_ids", []))
        if checkpointed:
            self.source.commit(checkpointed)
        if self.source.redelivers:
            self.skip_ids = set(checkpointed)
        self.dropped.update(meta.get("dropped", {}))
        trained_log.truncate(self._trained_log, step)
        log.info("resumed from checkpoint step %d (%d samples acknowledged on resume)",
                 step, len(self.skip_ids))

    def save_checkpoint(self) -> None:
        if self._saved_step == self.step:
            return
        self._saved_step = self.step
        ids, self.unacked = self.unacked, []
        # Every process's trained ids go into the one meta file (orbax writes it from process
        # 0): after a restart each process acknowledges all of them (idempotent at the buffer).
        # So do the source's acknowledgements still pending from earlier checkpoints (the buffer
        # was down): a resume reads the newest meta only.
        pending = sorted(getattr(self.source, "ack_pending", ()))
        everyone = sorted({i for part in dist_lib.gather_json(ids + pending) for i in part})
        meta = {"source": self.source.state(), "policy_version": self.policy_version,
                "unacked_ids": everyone, "dropped": dict(self.dropped), **self._model_meta()}
        carry = self._rollback_carry

        def committed():
            self.source.commit(ids)
            self._in_hand.difference_update(everyone)
            self._checkpoint_committed(carry)

        self.checkpointer.save(self.step, self.state, meta, on_commit=committed)

    # ------------------------------------------------------------------ samples
    def take_samples(self) -> list[Sample]:
        """Blocks until `samples_per_step` admissible samples are in hand; returns them, or []
        on a stop that comes first (those in hand go back to the source untrained,
        `source.release`: a step is never trained short). Raises `ConfigError` (`replay`) when
        a looping source starts over before the step is full (a sample would repeat)."""
        want = self.config.trainer.samples_per_step
        out: list[Sample] = []
        seen: set[str] = set()  # every id taken for this step, admitted or not
        topk: int | None = None  # the step's top-K width, once a top-K sample is in
        while len(out) < want and not self.stopping:
            got = self.source.take(want - len(out), self.config.trainer.take_timeout_s)
            for s in got:
                if self.source.loops and s.sample_id in seen:
                    raise sources.replay_wrapped_error(self.source.path, len(out), want)
                seen.add(s.sample_id)
                if s.sample_id in self.skip_ids:  # in a restored checkpoint already
                    self.source.commit([s.sample_id])
                    continue
                if self.source.redelivers and s.sample_id in self._in_hand:
                    # redelivered (e.g. the buffer restarted)
                    continue  # its update is in hand; the next checkpoint acknowledges it
                if any(s.sample_id == o.sample_id for o in out):  # a redelivery, a re-put
                    continue
                reason = intake.admit(s, self.config, vocab_size=self.model_config.vocab_size,
                                      policy_version=self.policy_version, topk=topk)
                if reason is None:
                    out.append(s)
                    topk = topk if topk is not None else s.topk_width
                else:
                    self.dropped[reason] += 1
                    self.source.reject(s, reason)
            self.source.keepalive()
            self.checkpointer.poll()
        if len(out) < want:  # stopped first
            log.info("stopping: %d of %d samples of the next step given back untrained",
                     len(out), want)
            self.source.release(out)
            return []
        return out

    def pack(self, samples: list[Sample]):
        """Packs samples into a `[M, R, L]` stack of micro-batches placed on the mesh. With
        several processes each packs its own samples into the shape all agree on (rows, top-K
        width, score capacity: one jitted program) and the global stack joins their rows."""
        micro = self.config.trainer.micro_batches
        packed = batch_lib.pack(samples, self.config.trainer.token_budget, row_buckets=ROW_BUCKETS,
                                row_multiple=micro * self.local_data_parallel,
                                need_rollout_logp=intake.needs_rollout_logp(self.config))
        assert len(packed) == 1, "ROW_BUCKETS holds every step's rows in one batch"
        rows = dist_lib.pad_rows_to_common(packed[0]) if jax.process_count() > 1 else packed[0]
        capacity = batch_lib.score_capacity(np.asarray(rows.loss_mask))
        if jax.process_count() > 1:  # one shape for the global array: the largest of any process
            capacity = dist_lib.common_max(capacity)
        rows = batch_lib.with_score_index(rows, capacity)
        return dist_lib.global_batch(trainer.split_rows(rows, micro), self.stack_sharding)

    # ------------------------------------------------------------------ loop
    def train_step(self, samples: list[Sample]) -> dict:
        """One update on `samples`; returns host metrics."""
        start = time.perf_counter()
        version_before = self.policy_version
        stack = self.pack(group_norm.normalize_rewards(samples, self.config.loss.group_norm))
        shapes_known = _cache_size(self._step)
        self.state, metrics = self._step(self.state, stack, self.ref_params)
        version = self.policy_version
        ids = [s.sample_id for s in samples]
        # Recorded before anything else can raise: a checkpoint of this state (also the one
        # `run` saves on an error) must list these samples, or a resume trains them again.
        self.unacked.extend(ids)
        self._in_hand.update(ids)
        trained_log.append(self._trained_log, version, ids)
        # 1 when this step's shapes (rows, score capacity) were new to the jitted step: its
        # step_time_s includes tracing and compiling (a one-off stall per shape).
        compiled = float(_cache_size(self._step) > shapes_known)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - start
        # Every process's ids and sample stats (one gather): the metrics are the step's, and a
        # buffer restart requeues what any process trained and has not yet acknowledged, which
        # another process may lease (`take_samples` skips what is in hand).
        own = (ids, sample_stats(samples, version_before))
        shares = [own] if jax.process_count() == 1 else dist_lib.gather_json(own)
        metrics.update(
            **sample_metrics([stats for _, stats in shares], elapsed),
            step_time_s=elapsed, compiled=compiled, policy_version=version,
            skipped_total=float(self.state.skipped), gate_refusals=float(self.gate_refusals),
            gate_score_s=self._gate_score_s,
            **{f"dropped_{k}": float(v) for k, v in self.dropped.items()},
            **self._thread_s,
        )
        self._in_hand.update(i for share_ids, _ in shares for i in share_ids)
        if self.extra_metrics is not None:
            metrics.update(self.extra_metrics())
        return metrics

    def run(self) -> None:
        """Trains to `trainer.steps` (or a stop). With a background gate, the last candidate's
        decision is awaited at the end: a refusal rolls back and training resumes (after a
        stop it still rolls back, so the final checkpoint is never a refused trajectory)."""
        try:
            while True:
                self._run_steps()
                rolled_back = self._settle_last_candidate()
                if self.stopping or not rolled_back:
                    break
        except Exception:
            self._save_before_raising()
            raise
        finally:
            self.flush_metrics()  # the step the run stopped at (a stop, an error)
        self.save_checkpoint()  # no-op when this step is already saved
        self.checkpointer.wait()

    def _save_before_raising(self) -> None:
        """A run ending on an error between steps (the buffer refusing a rotated token, a source
        that failed) keeps what it trained: the state is checkpointed before the error is
        raised. One process only (a save is a collective the others may not join). An error
        that left no state to save (an update that failed after donating it) or a failed save
        is logged; the run's own error is the one raised."""
        if jax.process_count() > 1:
            return
        try:
            self.save_checkpoint()
            self.checkpointer.wait()
        except Exception:
            log.exception("could not checkpoint the trained steps before stopping on an error")

    def log_step(self, metrics: dict) -> None:
        """Writes the metrics of the step just trained when it is a multiple of
        `trainer.log_every` or the last (`trainer.steps`); otherwise holds them until the next
        step replaces them or `flush_metrics` (the run stops) writes them. Nothing else
        depends on it: skip counts, checkpoints and publishing see every step."""
        self._unwritten = (self.step, metrics)
        if self.step % self.config.trainer.log_every == 0 or \
                self.step >= self.config.trainer.steps:
            self.flush_metrics()

    def flush_metrics(self) -> None:
        if self._unwritten is not None:
            self.metrics.write(*self._unwritten)
            self._unwritten = None

    def _run_steps(self) -> None:
        cfg = self.config
        skips_in_a_row = 0
        while self.step < cfg.trainer.steps and not self.stopping:
            waited = time.perf_counter()
            samples = self.take_samples()
            if not samples:
                continue
            self._thread_s["take_wait_s"] = time.perf_counter() - waited
            metrics = self.train_step(samples)
            self.log_step(metrics)
            skips_in_a_row = 0 if metrics["finite"] else skips_in_a_row + 1
            if skips_in_a_row:
                log.warning("non-finite loss or gradient: update skipped (%d in a row)",
                            skips_in_a_row)
            if skips_in_a_row > cfg.trainer.max_consecutive_skips:
                raise FloatingPointError(
                    f"{skips_in_a_row} consecutive updates had a non-finite loss or gradient "
                    f"(trainer.max_consecutive_skips = {cfg.trainer.max_consecutive_skips})")
            if hasattr(self.source, "set_policy_version"):
                self.source.set_policy_version(self.policy_version)
            after = time.perf_counter()
            self._thread_s["gate_s"] = 0.0
            if not self.settle_gate():  # a rollback leaves nothing new to save or publish
                if self.step % cfg.checkpoint.every_steps == 0:
                    self.save_checkpoint()
                self.maybe_publish()
            self.checkpointer.poll()
            self._thread_s["after_step_s"] = time.perf_counter() - after

    def install_signal_handlers(self) -> None:
        """SIGTERM / Ctrl-C finish the current step, checkpoint and exit cleanly (the
        handlers only record the signal: see `cli_signals.record_stop_signals`)."""
        self._signals = cli_signals.record_stop_signals(
            "signal {signum}: stopping after this step (checkpoint will be saved)\n")

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """A stop was asked for: `stop()`, or SIGINT / SIGTERM once the handlers are installed."""
        return self._stop.is_set() or bool(self._signals)

    def close(self) -> None:
        self.checkpointer.close()
        self.metrics.close()
        if self.publisher is not None:
            self.publisher.close()
        self.source.close()
