"""The one ConfigDict every entry point reads: its keys, defaults, method presets and validation.

`configs/*.py` start from `base_config()` and change what their run needs; the command line
overrides single keys (`--config.trainer.lr=3e-6`). The dict is locked, so a misspelt key fails
at parse time naming the key; `validate(config)` then checks every value and names the key that
is wrong. Loss fields left as `None` take the defaults of `config.method` (SPEC.md §2–§3).
"""

from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict

from clawjax.group_norm import GROUP_NORM_MODES
from clawjax.methods import METHOD_LOSS_DEFAULTS, METHOD_PRM_M, METHODS, prm_m_for  # noqa: F401
from clawjax.sample import MAX_TOPK

# = clawjax.model.config.ATTENTION_IMPLEMENTATIONS (a test keeps them equal; importing the model
# package here would load JAX for every `--help`).
ATTENTION_IMPLEMENTATIONS = ("xla", "pallas_gpu", "pallas_tpu")
# Packed rows (trainer.token_budget tokens) must be a multiple of the kernel's smallest block
# (clawjax.kernels: GPU 16, TPU 128, the lane width; a test keeps these equal).
ATTENTION_ROW_MULTIPLE = {"xla": 1, "pallas_gpu": 16, "pallas_tpu": 128}
GATE_ROLLBACK = ("checkpoint", "memory")  # where the regression gate's rollback target is kept
# JAX platform names `rollout.server_platforms` may list (JAX_PLATFORMS of the policy server).
SERVER_PLATFORMS = ("cpu", "cuda", "gpu", "rocm", "tpu")


# A tiny random Qwen3 that trains in seconds on a CPU (vocabulary ≥ 512 for recorded files).
TINY_QWEN3 = dict(
    model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
    tie_word_embeddings=False,
)


class ConfigError(ValueError):
    """A config key holds a bad value; the message names the key, the value and the expectation."""

    def __init__(self, key: str, value, expected: str):
        self.key = key
        super().__init__(f"config key {key!r} = {value!r}, expected {expected}")


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with CPU-friendly defaults."""
    c = ml_collections.ConfigDict()
    c.workdir = "workdir"
    c.method = "combine"
    c.replay = ""  # JSONL of samples; "" = the gRPC buffer if buffer.address, else in-process
    c.compile_cache_dir = "auto"  # XLA cache: "auto" = <workdir>/xla_cache, "" = off, else a dir

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # HF checkpoint directory; "" = random init from model.hf_config
    c.model.hf_config = dict(TINY_QWEN3)
    c.model.dtype = "float32"  # weight and compute dtype: float32 | bfloat16 (float32 masters)
    c.model.remat = False  # rematerialise each block in the backward pass
    c.model.attention = "xla"  # training self-attention: xla | pallas_gpu | pallas_tpu (flash kernels)
    c.model.seed = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1 takes the remaining devices
    c.mesh.tensor = 1

    c.loss = ml_collections.ConfigDict()
    c.loss.w_rl = config_dict.placeholder(float)
    c.loss.w_opd = config_dict.placeholder(float)
    c.loss.eps_clip = 0.2
    c.loss.eps_clip_high = 0.28
    c.loss.dual_clip = config_dict.placeholder(float)
    c.loss.kl_coef = config_dict.placeholder(float)
    c.loss.kl_kind = "low_var_kl"
    # True costs one more forward per micro-batch and a second copy of the parameters.
    c.loss.report_kl = True  # compute and report `kl` to the reference even at kl_coef 0 (SPEC §3)
    c.loss.entropy_coef = 0.0
    c.loss.group_norm = "none"  # GRPO rewards per prompt group: none | mean | mean_std (SPEC §2)
    c.loss.reduction = "sample_mean"
    c.loss.topk_coef = 0.0
    c.loss.use_tis = False
    c.loss.tis_cap = 2.0
    c.loss.old_logp = "rollout"  # rollout | recompute
    c.loss.logp_chunk = 1024  # vocabulary chunk of token_logp_and_entropy

    c.trainer = ml_collections.ConfigDict()
    c.trainer.steps = 100
    c.trainer.lr = 1e-5
    c.trainer.b1 = 0.9
    c.trainer.b2 = 0.98
    c.trainer.weight_decay = 0.1
    c.trainer.grad_clip = 1.0
    c.trainer.samples_per_step = 16
    c.trainer.token_budget = 1024  # tokens per packed row
    c.trainer.max_response_len = 0  # 0: no bound; else drop samples with longer responses
    c.trainer.micro_batches = 1
    c.trainer.resume = False
    c.trainer.seed = 0
    # Not with replay: replayed samples carry the policy versions they were recorded with.
    c.trainer.max_staleness = -1  # -1: no bound; else drop samples this many versions behind
    c.trainer.take_timeout_s = 60.0
    c.trainer.max_consecutive_skips = 20  # then stop: the run has diverged
    c.trainer.log_every = 1
    c.trainer.progress = True

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.buffer = ml_collections.ConfigDict()
    c.buffer.address = ""
    c.buffer.token_file = ""
    c.buffer.tls_ca = ""
    c.buffer.keepalive_s = 5.0  # lease keep-alive period for samples awaiting a checkpoint

    c.publish = ml_collections.ConfigDict()
    c.publish.every_steps = 0  # 0: never publish
    c.publish.dir = ""  # "" = workdir/publish; a new run refuses one holding v<step> dirs
    c.publish.urls = ""  # comma-separated server URLs
    c.publish.keep = 2
    c.publish.dtype = "bfloat16"
    # The key the fleet was started with: launch/sglang_fleet.sh API_KEY, `clawjax.serve --api-key`.
    c.publish.api_key_file = ""  # file holding the fleet's API key, sent as Bearer; "" = none

    c.rollout = ml_collections.ConfigDict()
    c.rollout.local = False  # True: run buffer, server, judge, proxy and agents here (default task)
    c.rollout.agents = 8  # concurrent simulated users
    c.rollout.prm_m = config_dict.placeholder(int)  # judge votes per turn; None = 3 for rl, else 1
    c.rollout.temperature = 1.0
    c.rollout.max_tokens = 16
    c.rollout.max_batch = 16  # decode slots of the embedded server
    # e.g. "cuda" with the trainer on the CPU, or "cpu" to leave a GPU to the trainer: serving
    # and training on separate devices, as a fleet and a trainer are
    c.rollout.server_platforms = ""  # JAX_PLATFORMS of the embedded server; "" = the trainer's
    c.rollout.lease_timeout_s = 30.0
    # K > 0: OPD samples also carry the teacher's top-K log-probs and ids per response token
    c.rollout.teacher_topk = 0  # teacher top-K per OPD token (SPEC §5); loss.topk_coef needs it

    c.eval = ml_collections.ConfigDict()
    # A policy version is the trainer step it was published at: with publish.every_steps = 2
    # and eval.every_steps = 10, every 5th published version is evaluated.
    c.eval.every_steps = 4  # evaluate every this many policy versions (trainer steps, not publishes)
    c.eval.samples_per_task = 4
    c.eval.final_samples_per_task = 16  # answers per held-out task, warm-start and final scores

    c.warmstart = ml_collections.ConfigDict()
    c.warmstart.hidden_size = 128
    c.warmstart.intermediate_size = 384
    c.warmstart.num_layers = 2
    c.warmstart.num_heads = 4
    c.warmstart.num_kv_heads = 2
    c.warmstart.steps = 500
    c.warmstart.batch_size = 24
    c.warmstart.rows = 8  # packed rows per warm-start step (fixed: one compile)
    c.warmstart.token_budget = 512
    c.warmstart.lr = 3e-3
    c.warmstart.seed = 0
    c.warmstart.examples = 20000
    c.warmstart.explain_share = 0.25  # plain prompts answered in the preferred form
    c.warmstart.hinted_share = 0.4  # prompts carrying a hint as the teacher context does
    c.warmstart.heldout_share = 0.1

    c.gate = ml_collections.ConfigDict()
    c.gate.enabled = False  # score each candidate on a probe set before publishing it
    c.gate.probe = ""  # JSONL of probe samples (replay format)
    c.gate.margin = 0.5  # refuse a candidate whose probe mean log-prob drops by more
    # "checkpoint": an orbax save at each accepted publish (the trainer waits for the previous
    # save to finish); "memory": an on-device copy of the train state (no disk, one more copy
    # of the parameters and optimizer state)
    c.gate.rollback = "checkpoint"  # where the last accepted state is kept: checkpoint | memory
    # True: the publisher thread scores each candidate while the trainer trains on; a refusal
    # rolls the trainer back at its next step boundary (the steps trained on top of the refused
    # candidate are discarded too; with rollback "memory" a candidate in flight holds one more
    # copy of the state). False, or several processes (the scoring is a collective): the
    # trainer thread scores and rolls back before its next update.
    c.gate.background = True  # score candidates off the trainer thread

    c.distributed = ml_collections.ConfigDict()  # multi-host (clawjax/distributed.py)
    c.distributed.enabled = config_dict.placeholder(bool)  # None: auto (SLURM / TPU pod env)
    c.distributed.coordinator_address = ""  # "host:port" of process 0; "" = detected by JAX
    c.distributed.num_processes = -1  # with coordinator_address; -1 = detected
    c.distributed.process_id = -1  # with coordinator_address; -1 = detected
    c.distributed.initialization_timeout_s = 300  # fail start-up if a process never joins
    c.distributed.heartbeat_timeout_s = 100  # stop every process this long after one dies
    c.distributed.local_device_ids = ""  # "0,1,…": this process's GPUs; "" = JAX's choice
    c.distributed.cpu_collectives = "gloo"  # CPU backend collectives across processes
    return c


def resolved_loss_kwargs(config) -> dict:
    """`LossConfig` keyword arguments with the method's defaults filled in."""
    preset = METHOD_LOSS_DEFAULTS[config.method]
    loss = config.loss
    out = dict(
        w_rl=preset["w_rl"] if loss.w_rl is None else float(loss.w_rl),
        w_opd=preset["w_opd"] if loss.w_opd is None else float(loss.w_opd),
        kl_coef=preset["kl_coef"] if loss.kl_coef is None else float(loss.kl_coef),
        eps_clip=float(loss.eps_clip), eps_clip_high=float(loss.eps_clip_high),
        dual_clip=None if loss.dual_clip is None else float(loss.dual_clip),
        kl_kind=str(loss.kl_kind), entropy_coef=float(loss.entropy_coef),
        reduction=str(loss.reduction), topk_coef=float(loss.topk_coef),
        use_tis=bool(loss.use_tis), tis_cap=float(loss.tis_cap),
    )
    return out


def resolved_prm_m(config) -> int:
    """`prm_m_for` of the config's `method` and `rollout.prm_m`."""
    return prm_m_for(config.method, config.rollout.prm_m)


def _check(ok: bool, key: str, value, expected: str):
    if not ok:
        raise ConfigError(key, value, expected)


def read_secret_file(key: str, path: str, holds: str) -> str | None:
    """The secret in the file a key names (`publish.api_key_file`, `buffer.token_file`): its
    stripped content, None for "" (none). Raises `ConfigError` naming the key when the file
    cannot be read or holds no `holds`."""
    if not path:
        return None
    try:
        with open(path) as f:
            secret = f.read().strip()
    except OSError as e:
        raise ConfigError(key, path, f"a readable file holding {holds} ({e.strerror}), or '' "
                          "for none") from e
    _check(bool(secret), key, path, f"a file holding {holds}, not an empty one")
    return secret


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


PUBLISH_KEEP_EXPECTED = "an integer ≥ 1 (the version the fleet serves must stay on disk)"


def check_publish_keep(keep) -> None:
    """Raises `ConfigError` for a `publish.keep` below 1 (`validate`, and
    `clawjax.publish.publisher_from_config` for a publish ConfigDict of a caller's own)."""
    _check(_is_int(keep) and keep >= 1, "publish.keep", keep, PUBLISH_KEEP_EXPECTED)


def validate_warmstart(w) -> None:
    """Raises `ConfigError` naming the first `warmstart.*` key (`w` is the section) that
    `clawjax.warmstart` / `clawjax.default_task` would fail on, after the local run moved an
    earlier run aside: sizes of the tiny Qwen3, the steps, batch and example counts, the rows
    a step packs into, the learning rate, the seed and the three shares."""
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "steps", "batch_size", "rows", "examples"):
        _check(_is_int(w[key]) and w[key] >= 1, f"warmstart.{key}", w[key], "an integer ≥ 1")
    head_dim = w.hidden_size // w.num_heads
    _check(head_dim >= 2 and head_dim % 2 == 0, "warmstart.hidden_size", w.hidden_size,
           f"a value whose head_dim = hidden_size // warmstart.num_heads = {w.num_heads} is even "
           f"and ≥ 2 (rope rotates pairs; here {head_dim})")
    _check(w.num_heads % w.num_kv_heads == 0, "warmstart.num_kv_heads", w.num_kv_heads,
           f"a divisor of warmstart.num_heads = {w.num_heads} (grouped-query attention)")
    _check(w.examples >= w.batch_size, "warmstart.examples", w.examples,
           f"at least warmstart.batch_size = {w.batch_size} (each step samples a batch of "
           "distinct examples)")
    _check(_is_int(w.token_budget) and w.token_budget >= 2, "warmstart.token_budget",
           w.token_budget, "an integer ≥ 2 (tokens per packed row)")
    _check(_is_number(w.lr) and w.lr > 0, "warmstart.lr", w.lr, "a positive learning rate")
    _check(_is_int(w.seed) and w.seed >= 0, "warmstart.seed", w.seed, "an integer ≥ 0")
    for key in ("explain_share", "hinted_share"):
        _check(_is_number(w[key]) and 0 <= w[key] <= 1, f"warmstart.{key}", w[key],
               "a share in [0, 1]")
    _check(_is_number(w.heldout_share) and 0 <= w.heldout_share < 1, "warmstart.heldout_share",
           w.heldout_share, "a share in [0, 1)")
    from clawjax import default_task

    train, heldout = default_task.split_tasks(w.heldout_share, w.seed)
    _check(len(train) >= 2, "warmstart.heldout_share", w.heldout_share,
           f"a share that leaves at least 2 training tasks of the {len(train) + len(heldout)} "
           f"(it leaves {len(train)}; the gate's probe takes some of them)")


def validate(config) -> None:
    """Raises `ConfigError` naming the first key whose value is out of its domain."""
    c = config
    _check(c.method in METHODS, "method", c.method, f"one of {METHODS}")
    _check(isinstance(c.compile_cache_dir, str), "compile_cache_dir", c.compile_cache_dir,
           "a directory, 'auto' (<workdir>/xla_cache) or '' (off)")
    _check(c.model.dtype in ("float32", "bfloat16"), "model.dtype", c.model.dtype,
           "'float32' or 'bfloat16'")
    _check(c.model.attention in ATTENTION_IMPLEMENTATIONS, "model.attention", c.model.attention,
           f"one of {ATTENTION_IMPLEMENTATIONS}")
    _check(bool(c.model.path) or bool(c.model.hf_config), "model.path", c.model.path,
           "an HF checkpoint directory, or model.hf_config for a random model")
    for axis in ("data", "fsdp", "tensor"):
        size = c.mesh[axis]
        _check(isinstance(size, int) and (size == -1 or size >= 1), f"mesh.{axis}", size,
               "a positive integer or -1 (the remaining devices)")
    _check(c.loss.old_logp in ("rollout", "recompute"), "loss.old_logp", c.loss.old_logp,
           "'rollout' or 'recompute'")
    _check(c.loss.group_norm in GROUP_NORM_MODES, "loss.group_norm", c.loss.group_norm,
           f"one of {GROUP_NORM_MODES}")
    _check(c.rollout.prm_m is None or c.rollout.prm_m >= 1, "rollout.prm_m", c.rollout.prm_m,
           "None (the method's default) or at least 1")
    _check(all(p in SERVER_PLATFORMS for p in c.rollout.server_platforms.split(","))
           if c.rollout.server_platforms else True, "rollout.server_platforms",
           c.rollout.server_platforms, f"'' or a comma-separated list of {SERVER_PLATFORMS}")
    _check(0 <= c.rollout.teacher_topk <= MAX_TOPK, "rollout.teacher_topk",
           c.rollout.teacher_topk, f"0 (none) to {MAX_TOPK}")
    _check(not (c.rollout.local and c.loss.topk_coef > 0 and c.rollout.teacher_topk == 0),
           "rollout.teacher_topk", c.rollout.teacher_topk,
           f"K ≥ 1 with loss.topk_coef = {c.loss.topk_coef} in a local run (the top-K loss "
           "needs the teacher's top-K in the samples)")
    _check(c.loss.logp_chunk >= 1, "loss.logp_chunk", c.loss.logp_chunk, "an integer ≥ 1")
    t = c.trainer
    _check(t.steps >= 0, "trainer.steps", t.steps, "an integer ≥ 0")
    _check(t.lr > 0, "trainer.lr", t.lr, "a positive learning rate")
    _check(0 <= t.b1 < 1, "trainer.b1", t.b1, "a value in [0, 1)")
    _check(0 <= t.b2 < 1, "trainer.b2", t.b2, "a value in [0, 1)")
    _check(t.weight_decay >= 0, "trainer.weight_decay", t.weight_decay, "a value ≥ 0")
    _check(t.grad_clip > 0, "trainer.grad_clip", t.grad_clip, "a positive global-norm bound")
    _check(t.samples_per_step >= 1, "trainer.samples_per_step", t.samples_per_step,
           "an integer ≥ 1")
    _check(t.token_budget >= 2, "trainer.token_budget", t.token_budget, "an integer ≥ 2")
    _check(_is_int(t.max_response_len) and t.max_response_len >= 0, "trainer.max_response_len",
           t.max_response_len, "an integer ≥ 0 (0: no bound)")
    multiple = ATTENTION_ROW_MULTIPLE[c.model.attention]
    _check(t.token_budget % multiple == 0, "trainer.token_budget", t.token_budget,
           f"a multiple of {multiple} with model.attention = {c.model.attention!r} (its "
           "flash kernel's smallest block)")
    _check(isinstance(t.log_every, int) and t.log_every >= 1, "trainer.log_every",
           t.log_every, "an integer ≥ 1 (write metrics every this many steps)")
    _check(t.micro_batches >= 1, "trainer.micro_batches", t.micro_batches, "an integer ≥ 1")
    _check(t.max_staleness >= -1, "trainer.max_staleness", t.max_staleness,
           "-1 (no bound) or an integer ≥ 0")
    _check(not (c.replay and t.max_staleness >= 0), "trainer.max_staleness", t.max_staleness,
           f"-1 (no bound) with replay = {c.replay!r}: replayed samples carry the policy "
           "versions they were recorded with, so every one would soon be dropped as stale")
    _check(_is_int(t.max_consecutive_skips) and t.max_consecutive_skips >= 0,
           "trainer.max_consecutive_skips", t.max_consecutive_skips, "an integer ≥ 0")
    # A wait of 0 (or NaN) returned at once and the loop asked again without a pause: a
    # busy loop, and a flood of Lease calls to the buffer (likewise the lease keeper's period).
    for key, value, holds in (
            ("trainer.take_timeout_s", t.take_timeout_s,
             "how long one wait for samples may block before the loop checks for a stop"),
            ("buffer.keepalive_s", c.buffer.keepalive_s,
             "the period of the lease keep-alive for samples awaiting a checkpoint"),
            ("rollout.lease_timeout_s", c.rollout.lease_timeout_s,
             "how long the local buffer's lease lasts without a keep-alive")):
        _check(_is_number(value) and value > 0, key, value, f"a positive number of seconds "
                                                             f"({holds})")
    _check(not c.rollout.local or c.buffer.keepalive_s < c.rollout.lease_timeout_s,
           "buffer.keepalive_s", c.buffer.keepalive_s,
           f"less than rollout.lease_timeout_s = {c.rollout.lease_timeout_s} in a local run "
           "(a lease not kept alive within its timeout is given to another consumer)")
    _check(c.checkpoint.every_steps >= 1, "checkpoint.every_steps", c.checkpoint.every_steps,
           "an integer ≥ 1")
    _check(c.checkpoint.keep >= 1, "checkpoint.keep", c.checkpoint.keep, "an integer ≥ 1")
    _check(c.publish.every_steps >= 0, "publish.every_steps", c.publish.every_steps,
           "an integer ≥ 0 (0 = never)")
    check_publish_keep(c.publish.keep)
    _check(c.publish.dtype in ("float32", "bfloat16"), "publish.dtype", c.publish.dtype,
           "'float32' or 'bfloat16'")
    read_secret_file("publish.api_key_file", c.publish.api_key_file, "the fleet's API key")
    read_secret_file("buffer.token_file", c.buffer.token_file, "the buffer's token")
    _check(c.gate.rollback in GATE_ROLLBACK, "gate.rollback", c.gate.rollback,
           f"one of {GATE_ROLLBACK}")
    _check(c.gate.margin >= 0, "gate.margin", c.gate.margin, "a value ≥ 0 (nats per token)")
    for key in ("samples_per_task", "final_samples_per_task"):
        _check(_is_int(c.eval[key]) and c.eval[key] >= 1, f"eval.{key}", c.eval[key],
               "an integer ≥ 1")
    # No "off" value: a number of versions larger than the run (the bench's 1000000) is none.
    _check(_is_int(c.eval.every_steps) and c.eval.every_steps >= 1, "eval.every_steps",
           c.eval.every_steps, "an integer ≥ 1 (evaluate every this many policy versions; a "
           "number larger than trainer.steps for no periodic evaluation)")
    validate_warmstart(c.warmstart)
    d = c.distributed
    if d.coordinator_address:
        _check(":" in d.coordinator_address, "distributed.coordinator_address",
               d.coordinator_address, "'host:port' of process 0")
        _check(d.num_processes >= 1, "distributed.num_processes", d.num_processes,
               "the number of processes (≥ 1) when distributed.coordinator_address is set")
        _check(0 <= d.process_id < d.num_processes, "distributed.process_id", d.process_id,
               f"this process's index in [0, {d.num_processes}) when coordinator_address is set")
    _check(d.initialization_timeout_s >= 1, "distributed.initialization_timeout_s",
           d.initialization_timeout_s, "an integer ≥ 1 (seconds)")
    _check(d.heartbeat_timeout_s >= 1, "distributed.heartbeat_timeout_s",
           d.heartbeat_timeout_s, "an integer ≥ 1 (seconds)")
    _check(all(x.strip().isdigit() for x in d.local_device_ids.split(",")) if d.local_device_ids
           else True, "distributed.local_device_ids", d.local_device_ids,
           "comma-separated device ids such as '0,1,2,3', or '' for JAX's default")
    _check(d.cpu_collectives in ("gloo", "mpi"), "distributed.cpu_collectives",
           d.cpu_collectives, "'gloo' or 'mpi'")
    _check(not (c.replay and c.buffer.address), "replay", c.replay,
           "empty when buffer.address is set (one sample source at a time)")
    from clawjax import losses

    try:
        losses.LossConfig(**resolved_loss_kwargs(c))
    except (ValueError, TypeError) as e:
        raise ConfigError("loss", dict(c.loss), f"valid LossConfig fields ({e})") from e
