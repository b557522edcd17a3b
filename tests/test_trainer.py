"""The trainer: overfitting, sharded = single-device, accumulation = full batch, non-finite skip,
config errors, signals, resume and metrics (the samples a loop takes: test_trainer_samples)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clawjax import config as config_lib
from clawjax.configs import tiny_cpu
from clawjax.loop import TrainLoop
from clawjax.metrics import read_metrics
from clawjax.sources import QueueSource, write_replay
from sample_factory import make_samples


def tiny_config(workdir, replay="", **overrides):
    c = tiny_cpu.get_config()
    c.workdir = str(workdir)
    c.replay = str(replay)
    c.trainer.progress = False
    c.checkpoint.async_save = False
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def params_of(loop) -> dict:
    return {"/".join(map(str, k)): np.asarray(v) for k, v in
            jax.tree_util.tree_flatten_with_path(jax.device_get(loop.state.params))[0]}


def max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def one_step(tmp_path, name, samples, **overrides) -> TrainLoop:
    source = QueueSource()
    source.put(samples)
    loop = TrainLoop(tiny_config(tmp_path / name, **overrides), source=source)
    loop.train_step(loop.take_samples())
    return loop


def test_overfits_a_fixed_replay_batch(tmp_path):
    samples = make_samples(8, seed=1)
    replay = tmp_path / "fixed.jsonl"
    write_replay(str(replay), samples)
    loop = TrainLoop(tiny_config(tmp_path / "run", replay, **{
        "trainer.steps": 30, "trainer.samples_per_step": 8, "trainer.lr": 3e-3,
        "checkpoint.every_steps": 100}))
    loop.run()
    loop.close()
    rows = read_metrics(str(tmp_path / "run"))
    assert len(rows) == 30
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert last < first - 0.5, (first, last)
    assert rows[-1]["policy_version"] == 30


def test_sharded_step_equals_single_device(tmp_path):
    """lr 1e-4 (SPEC's is 1e-5): Adam's first step moves each parameter by about lr·g/(|g|+ε),
    so on entries whose gradient is near ε, rounding differences of the sharded reductions
    (~1e-12) move the parameter by a fraction of lr; at the tests' usual 1e-3 that fraction
    alone could reach the 1e-5 bound without any real difference."""
    assert jax.device_count() == 8
    samples = make_samples(8, seed=2)
    single = one_step(tmp_path, "single", samples, **{
        "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "trainer.samples_per_step": 8,
        "trainer.lr": 1e-4})
    sharded = one_step(tmp_path, "sharded", samples, **{
        "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "trainer.samples_per_step": 8,
        "trainer.lr": 1e-4})
    specs = [p.sharding.spec for p in jax.tree.leaves(sharded.state.params)]
    assert any(any(axis is not None for axis in spec) for spec in specs), specs
    assert max_param_diff(params_of(single), params_of(sharded)) <= 1e-5


def test_sharded_kernel_step_with_remat_and_micro_batches_equals_the_xla_step(tmp_path):
    """`model.attention = "pallas_gpu"` (the flash kernel, interpreted here) on the 2 × 2 × 2
    mesh, inside the scan over micro-batches and under remat, trains the same update as the
    single-device XLA step: the kernel runs per shard (`clawjax.model.kernel_attention`) inside
    every transform the trainer applies (lr 1e-4 and bound 1e-5 as in the sharded test)."""
    samples = make_samples(8, seed=2)
    common = {"trainer.samples_per_step": 8, "trainer.micro_batches": 2,
              "trainer.token_budget": 64, "trainer.lr": 1e-4}
    xla = one_step(tmp_path, "xla", samples, **common)
    kernel = one_step(tmp_path, "kernel", samples, **common, **{
        "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "model.remat": True,
        "model.attention": "pallas_gpu"})
    assert kernel.model_config.attention == "pallas_gpu"
    assert max_param_diff(params_of(xla), params_of(kernel)) <= 1e-5


def test_accumulating_micro_batches_equals_one_batch(tmp_path):
    samples = make_samples(16, seed=3)
    whole = one_step(tmp_path, "whole", samples, **{
        "trainer.samples_per_step": 16, "trainer.micro_batches": 1, "trainer.token_budget": 64})
    micro = one_step(tmp_path, "micro", samples, **{
        "trainer.samples_per_step": 16, "trainer.micro_batches": 4, "trainer.token_budget": 64})
    assert micro.pack(samples).tokens.shape[0] == 4
    assert max_param_diff(params_of(whole), params_of(micro)) <= 1e-6


def test_remat_with_micro_batches_equals_the_plain_step(tmp_path):
    """`model.remat` inside the scan over micro-batches (the qwen3 configs use both) trains the
    same update as the plain step: rematerialisation changes memory, not the gradient (lr
    1e-4 as in the sharded test: a recomputed forward fuses differently, and Adam's first step
    turns float32 rounding of near-ε gradients into a fraction of lr)."""
    samples = make_samples(16, seed=4)
    common = {"trainer.samples_per_step": 16, "trainer.micro_batches": 2,
              "trainer.token_budget": 64, "trainer.lr": 1e-4}
    plain = one_step(tmp_path, "plain", samples, **common)
    remat = one_step(tmp_path, "remat", samples, **common, **{"model.remat": True})
    assert remat.model_config.remat and not plain.model_config.remat
    assert max_param_diff(params_of(plain), params_of(remat)) <= 1e-6


def test_low_precision_weights_take_every_update_through_float32_master_copies():
    """SPEC §6's lr 1e-5 moves a weight by ~1e-5, below half a bfloat16 spacing for |w| > ~4e-3:
    applied to bfloat16 weights directly it rounds away. The optimizer keeps float32 masters;
    the weights are the masters rounded (float64 reference: w − n·lr·g)."""
    from clawjax import trainer
    import optax

    w = {"a": jnp.asarray([1.0, 0.02, -0.5], jnp.bfloat16)}
    g = {"a": jnp.asarray([1.0, -1.0, 0.5], jnp.bfloat16)}
    for master in (False, True):
        opt = trainer.with_float32_master(optax.sgd(1e-5)) if master else optax.sgd(1e-5)
        params, state = w, opt.init(w)
        for _ in range(1000):
            updates, state = opt.update(g, state, params)
            params = optax.apply_updates(params, updates)
        got = np.asarray(params["a"], np.float64)
        want = np.asarray(w["a"], np.float64) - 1000 * 1e-5 * np.asarray(g["a"], np.float64)
        if master:
            assert params["a"].dtype == jnp.bfloat16
            np.testing.assert_array_equal(got, np.asarray(jnp.asarray(want, jnp.bfloat16),
                                                          np.float64))
        else:   # the failure the masters prevent: most of the updates rounded away
            assert np.abs(got - want).max() > 5e-3


def test_a_bfloat16_run_keeps_float32_masters_that_take_every_update(tmp_path):
    """Each bfloat16 weight is its float32 master rounded; after two steps at lr 1e-5 the
    masters of (nearly) all weights moved (weight decay alone moves an unused one), where the
    bfloat16 weights themselves move only as the masters cross a rounding boundary."""
    loop = one_step(tmp_path, "bf16", make_samples(4, seed=14), **{
        "model.dtype": "bfloat16", "trainer.lr": 1e-5, "trainer.samples_per_step": 4,
        "loss.report_kl": True})   # keeps the initial weights as the KL reference
    start = jax.tree.map(lambda w: np.asarray(w, np.float32), jax.device_get(loop.ref_params))
    loop.train_step(make_samples(4, seed=15, prefix="again"))
    masters = jax.device_get(loop.state.opt_state.master)
    params = jax.device_get(loop.state.params)
    for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(masters)):
        assert w.dtype == jnp.bfloat16 and m.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(w), np.asarray(m.astype(jnp.bfloat16)))
    moved = [np.mean(np.asarray(m) != s) for m, s in
             zip(jax.tree.leaves(masters), jax.tree.leaves(start))]
    assert np.mean(moved) > 0.9, moved
    loop.close()


def test_non_finite_gradient_skips_the_update_and_counts_it(tmp_path):
    loop = TrainLoop(tiny_config(tmp_path / "nan"), source=QueueSource())
    before = params_of(loop)
    stack = loop.pack(make_samples(8, seed=4))
    poisoned = dataclasses.replace(stack, rewards=jnp.full_like(stack.rewards, jnp.nan))
    loop.state, metrics = loop._step(loop.state, poisoned, loop.ref_params)
    assert float(metrics["finite"]) == 0.0
    assert int(loop.state.skipped) == 1 and int(loop.state.step) == 0
    assert max_param_diff(before, params_of(loop)) == 0.0


def test_a_step_that_meets_a_new_shape_is_flagged_compiled(tmp_path):
    """`compiled` (the bench leaves such steps out of its steady rate): the first step, and a
    step whose packed rows outnumber every earlier one's; not a repeat of known shapes."""
    loop = TrainLoop(tiny_config(tmp_path / "shapes"), source=QueueSource())
    few = make_samples(4, seed=10)
    many = make_samples(24, seed=11, prefix="many", min_len=100, max_len=120)
    assert loop.pack(many).tokens.shape[1] > loop.pack(few).tokens.shape[1]  # more rows
    flags = [loop.train_step(batch)["compiled"] for batch in (few, few, many, few)]
    assert flags == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("key,value,named", [
    ("trainer.lr", -1.0, "trainer.lr"),
    ("method", "ppo", "method"),
    ("mesh.tensor", 0, "mesh.tensor"),
    ("loss.reduction", "sum", "loss"),
    ("loss.old_logp", "server", "loss.old_logp"),
    ("model.attention", "flash", "model.attention"),
])
def test_bad_config_values_name_the_key(tmp_path, key, value, named):
    c = tiny_config(tmp_path, **{key: value})
    with pytest.raises(config_lib.ConfigError, match=named.replace(".", r"\.")):
        config_lib.validate(c)


def test_method_presets_fill_unset_loss_weights(tmp_path):
    c = tiny_config(tmp_path, method="rl")
    assert config_lib.resolved_loss_kwargs(c)["kl_coef"] == 0.02
    assert config_lib.resolved_loss_kwargs(c)["w_opd"] == 0.0
    c = tiny_config(tmp_path, method="combine", **{"loss.kl_coef": 0.5})
    kwargs = config_lib.resolved_loss_kwargs(c)
    assert (kwargs["w_rl"], kwargs["w_opd"], kwargs["kl_coef"]) == (1.0, 1.0, 0.5)


def test_method_presets_set_the_judge_votes(tmp_path):
    """SPEC §7: PRM_M defaults to 1, and to 3 for Binary RL; an explicit value wins."""
    votes = {m: config_lib.resolved_prm_m(tiny_config(tmp_path, method=m))
             for m in config_lib.METHODS}
    assert votes == {"rl": 3, "opd": 1, "combine": 1}
    assert config_lib.resolved_prm_m(tiny_config(tmp_path, method="rl",
                                                 **{"rollout.prm_m": 5})) == 5
    with pytest.raises(config_lib.ConfigError, match=r"rollout\.prm_m"):
        config_lib.validate(tiny_config(tmp_path, **{"rollout.prm_m": 0}))


def test_kl_to_the_reference_is_reported_at_kl_coef_zero(tmp_path):
    """SPEC §3: the combined method trains with kl_coef 0 but still computes and reports the KL
    to the initial policy: 0 on the first step (the policy is the reference), > 0 once it has
    moved, and the updates are those of a run that does not compute it."""
    samples = make_samples(8, seed=5)
    runs = {}
    for report in (True, False):
        source = QueueSource()
        again = [dataclasses.replace(s, sample_id=s.sample_id + "-again") for s in samples]
        source.put(samples + again)   # the same data twice: ids are unique (puts idempotent)
        loop = TrainLoop(tiny_config(tmp_path / f"report-{report}", method="combine", **{
            "loss.report_kl": report, "trainer.samples_per_step": 8}), source=source)
        assert config_lib.resolved_loss_kwargs(loop.config)["kl_coef"] == 0.0
        metrics = [loop.train_step(loop.take_samples()) for _ in range(2)]
        runs[report] = (metrics, params_of(loop))
        loop.close()
    (reported, params), (silent, params_silent) = runs[True], runs[False]
    assert reported[0]["kl"] == 0.0
    assert reported[1]["kl"] > 0.0 and math.isfinite(reported[1]["kl"])
    assert all("kl" not in m for m in silent)
    for a, b in zip(reported, silent):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    assert max_param_diff(params, params_silent) <= 1e-6


def test_sigterm_burst_finishes_the_step_checkpoints_and_stops(tmp_path):
    """SIGTERM / Ctrl-C (here a burst of them, as a second Ctrl-C or a supervisor adds) stop
    the run after the current step with a checkpoint, well before `trainer.steps`."""
    import os
    import signal
    import threading

    source = QueueSource()
    source.put(make_samples(8 * 40, seed=3))
    loop = TrainLoop(tiny_config(tmp_path / "run", **{"trainer.steps": 40,
                                                     "trainer.samples_per_step": 8,
                                                     "checkpoint.every_steps": 100}),
                     source=source)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        loop.install_signal_handlers()
        done, train_step = threading.Semaphore(0), loop.train_step

        def counted_step(samples):   # loop.step reads donated state: not from another thread
            out = train_step(samples)
            done.release()
            return out

        loop.train_step = counted_step

        def burst_after_two_steps():
            assert done.acquire(timeout=120) and done.acquire(timeout=120)
            for _ in range(100):
                os.kill(os.getpid(), signal.SIGTERM)

        thread = threading.Thread(target=burst_after_two_steps, daemon=True)
        thread.start()
        loop.run()
        thread.join(10)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert loop.stopping and 2 <= loop.step < 40, loop.step
    assert loop.checkpointer.latest_step() == loop.step
    loop.close()


def _resume(workdir, **overrides) -> TrainLoop:
    source = QueueSource()
    source.put(make_samples(8, seed=1))
    return TrainLoop(tiny_config(workdir, **{"trainer.samples_per_step": 4,
                                             "trainer.resume": True, **overrides}),
                     source=source)


def test_a_torn_last_line_of_the_trained_log_does_not_block_the_resume(tmp_path):
    """A crash (or a full disk) mid-append leaves trained.jsonl with half a line; the checkpoint
    is whole, so the resume goes on: the torn line is dropped (logged), the rest kept."""
    loop = one_step(tmp_path, "run", make_samples(8, seed=1), **{"trainer.samples_per_step": 4})
    loop.save_checkpoint()
    loop.close()
    log_path = tmp_path / "run" / "trained.jsonl"
    whole = log_path.read_text()
    log_path.write_text(whole + '{"step": 2, "sample_ids": ["s1-')
    resumed = _resume(tmp_path / "run")
    try:
        assert resumed.step == 1 and log_path.read_text() == whole
    finally:
        resumed.close()


class AnnouncedSource(QueueSource):
    """A queue that keeps the policy versions the loop announces (as the buffer's source does)."""

    def __init__(self):
        super().__init__()
        self.announced: list[int] = []

    def set_policy_version(self, version: int) -> None:
        self.announced.append(version)


def test_a_resumed_run_serves_and_announces_the_restored_policy(tmp_path):
    """A crash after a publish newer than the last checkpoint leaves the fleet serving a policy
    the resumed run never trained (v2, restored from step 1): the resumed loop publishes v1 at
    once, off the publish cadence, and announces version 1 to its source."""
    publishing = {"trainer.samples_per_step": 4, "publish.every_steps": 2, "publish.keep": 3}
    source = QueueSource()
    source.put(make_samples(8, seed=1))
    loop = TrainLoop(tiny_config(tmp_path / "run", **publishing), source=source)
    loop.train_step(loop.take_samples())
    loop.save_checkpoint()
    loop.train_step(loop.take_samples())
    loop.maybe_publish()
    assert loop.publisher.wait(timeout=60)
    loop.close()
    publish_dir = tmp_path / "run" / "publish"
    assert sorted(p.name for p in publish_dir.iterdir() if p.name.startswith("v")) == ["v2"]

    source = AnnouncedSource()
    resumed = TrainLoop(tiny_config(tmp_path / "run", **publishing, **{"trainer.resume": True}),
                        source=source)
    try:
        assert resumed.step == 1 and resumed.publisher.wait(timeout=60)
        assert resumed.publisher.stats()["last_version"] == 1
        assert (publish_dir / "v1").is_dir() and source.announced == [1]
    finally:
        resumed.close()


def test_resume_refuses_a_checkpoint_of_another_model_config_or_dtype(tmp_path):
    """Same parameter shapes, other rope_theta / rms_norm_eps / dtype: orbax would cast the
    state (Adam moments included) into the new model; the resume names every difference."""
    from clawjax.checkpoint import CheckpointError
    from clawjax.model import ModelConfig

    loop = one_step(tmp_path, "run", make_samples(8, seed=1), **{"trainer.samples_per_step": 4})
    loop.save_checkpoint()
    loop.close()
    hf = dict(loop.config.model.hf_config)
    saved = ModelConfig.from_hf(hf)
    hf.update(rope_theta=1_000_000.0, rms_norm_eps=1e-2)
    with pytest.raises(CheckpointError) as info:
        _resume(tmp_path / "run", **{"model.dtype": "bfloat16", "model.hf_config": hf})
    message = str(info.value)
    for difference in (
            "checkpoint step 1 under",
            f"model_config.rope_theta = {saved.rope_theta!r} in the checkpoint, 1000000.0 now",
            f"model_config.rms_norm_eps = {saved.rms_norm_eps!r} in the checkpoint, 0.01 now",
            "param_dtype = 'float32' in the checkpoint, 'bfloat16' now"):
        assert difference in message, message
    # A training option (not the weights') may change on resume.
    loop = _resume(tmp_path / "run", **{"model.remat": True})
    assert loop.step == 1
    loop.close()


def test_a_checkpoint_saved_before_the_model_meta_still_resumes(tmp_path, caplog):
    loop = one_step(tmp_path, "run", make_samples(8, seed=1), **{"trainer.samples_per_step": 4})
    loop._model_meta = lambda: {}  # what an older version saved
    loop.save_checkpoint()
    loop.checkpointer.wait()
    saved = params_of(loop)
    loop.close()
    with caplog.at_level("INFO", logger="clawjax.checkpoint"):
        resumed = _resume(tmp_path / "run")
    try:
        assert resumed.step == 1 and max_param_diff(saved, params_of(resumed)) == 0.0
        assert "has no 'model_config' in its meta" in caplog.text
    finally:
        resumed.close()


def _stopping_at(step: int, loop_ref: list):
    """`extra_metrics` that stops the run once `step` is trained (as a SIGTERM would)."""

    def extra() -> dict:
        if loop_ref[0].step == step:
            loop_ref[0].stop()
        return {}

    return extra


def test_metrics_are_written_every_log_every_steps_the_last_and_the_stopped_one(tmp_path):
    written = {}
    for name, stop_at in (("full", None), ("stopped", 1)):
        source, loop_ref = QueueSource(), [None]
        source.put(make_samples(2 * 5, seed=40))
        loop = TrainLoop(tiny_config(tmp_path / name, **{
            "trainer.steps": 5, "trainer.samples_per_step": 2, "trainer.log_every": 2}),
            source=source, extra_metrics=_stopping_at(stop_at, loop_ref) if stop_at else None)
        loop_ref[0] = loop
        loop.run()
        loop.close()
        written[name] = [r["step"] for r in read_metrics(str(tmp_path / name))]
        assert loop.step == (stop_at or 5)  # every step trained, logged or not
    assert written == {"full": [2, 4, 5],  # every 2nd step and the last
                       "stopped": [1]}  # the step the run stopped at


def test_log_every_below_one_is_refused_naming_the_key(tmp_path):
    with pytest.raises(config_lib.ConfigError, match=r"'trainer\.log_every' = 0"):
        TrainLoop(tiny_config(tmp_path / "run", **{"trainer.log_every": 0}), source=QueueSource())
