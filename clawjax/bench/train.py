"""`python -m clawjax.bench train`: tokens/s of clawjax's jitted train step vs a PyTorch eager step.

For each model size (a tiny Qwen3 and a small one with a 32k vocabulary), float32 on JAX's
default device (the CPU, or a GPU where one is present; torch then runs on CUDA too, both with
full-float32 matrix products: `jax_default_matmul_precision="highest"`, TF32 off in torch):

- clawjax: `TrainLoop._step` — the product's jitted update (forward → chunked log-probs on
  the scored positions only, `TokenBatch.score_index` → combined PPO/OPD loss → gradients →
  clip → AdamW), on a `TrainLoop.pack` stack.
- torch: the SAME weights (clawjax `save_pretrained` → `transformers` `from_pretrained`, a
  `Qwen3ForCausalLM`), the SAME packed rows (`position_ids` restarting per segment and a
  block-diagonal causal 4-D float mask `[R, 1, L, L]`, so segments never attend across), the
  SAME loss written in torch below (PPO clip ε 0.2 / 0.28 on A = r + (teacher_logp −
  old_logp)·teacher_mask, sample-mean reduction), `clip_grad_norm_` and `torch.optim.AdamW` with
  the trainer's hyper-parameters; eager mode, `torch.set_num_threads` left at its default.
  Torch computes logits at every position, as an HF training step does; clawjax skips the
  prompt and padding positions the loss never reads (same loss, fewer LM-head products).

On a GPU (or with `--mfu`) last tables give the MFU of the Qwen3-0.6B config
(`configs/qwen3_0_6b.py`: bfloat16, remat, 16 samples per step, rows of 8192 tokens, 2
micro-batches; random weights of Qwen3-0.6B's shape, samples of 1024–4096 tokens), one per
`model.attention` (on a GPU: "xla" and the "pallas_gpu" flash kernel; on a TPU: "xla" and
"pallas_tpu"): model FLOPs per step
(`clawjax.bench._flops`) / step time, against the datasheet bf16 peak and against an 8192³ bf16
matrix product timed in the same process (`clawjax.bench._mfu`).

Before timing, the first step's loss of both is compared (equal work: same model, same batch,
same loss). Timed steps alternate between the two in this process after warm-up (the JAX
compile is excluded); the table reports medians. Tokens are the real (non-padding) tokens of
the packed batch; both sides process the same padded `[R, L]` slots.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clawjax.bench.common import print_table
from clawjax.config import TINY_QWEN3, base_config
from clawjax.sample import Sample

# Trainer hyper-parameters of both sides (SPEC §6).
LR, B1, B2, WEIGHT_DECAY, GRAD_CLIP = 1e-5, 0.9, 0.98, 0.1, 1.0
EPS_CLIP, EPS_CLIP_HIGH = 0.2, 0.28
ADAM_EPS = 1e-8  # optax.adamw's default, passed to torch explicitly
LOSS_TOLERANCE = 1e-4  # |loss_jax − loss_torch| / max(1, |loss|) on the first step


@dataclasses.dataclass(frozen=True)
class BenchSize:
    """One row of the table: an HF Qwen3 config and the synthetic batch trained on it."""

    name: str
    hf_config: dict
    samples: int  # samples per step
    token_budget: int  # L, tokens per packed row
    min_len: int
    max_len: int
    repeat_factor: int = 1  # timed steps = --repeats × this (cheap sizes: more, for stabler medians)


# Qwen3-0.6B's HF config.json (the MFU row builds random weights of this shape).
QWEN3_0_6B = dict(
    model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
    num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
    rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=40960,
    tie_word_embeddings=True,
)


def _qwen3(**overrides) -> dict:
    return {**TINY_QWEN3, **overrides}


def bench_sizes(quick: bool) -> list[BenchSize]:
    """tiny = `clawjax.config.TINY_QWEN3`; small = hidden 256, 4 layers, vocab 32768
    (`--quick`: hidden 128, 2 layers, vocab 4096 and fewer tokens, for a smoke run)."""
    tiny = BenchSize("tiny", _qwen3(), samples=16, token_budget=256, min_len=32, max_len=128,
                     repeat_factor=4)
    if quick:
        tiny = dataclasses.replace(tiny, samples=6, token_budget=128, min_len=16, max_len=64,
                                   repeat_factor=1)
        small = BenchSize("small", _qwen3(vocab_size=4096, hidden_size=128, intermediate_size=384,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=32),
                          samples=6, token_budget=128, min_len=16, max_len=64)
    else:
        small = BenchSize("small", _qwen3(vocab_size=32768, hidden_size=256,
                                          intermediate_size=768, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=64),
                          samples=8, token_budget=256, min_len=64, max_len=128)
    return [tiny, small]


def make_samples(size: BenchSize, seed: int = 0) -> list[Sample]:
    """Valid synthetic samples: random tokens, a response of 1/4..3/4 of the sample, rewards ±1,
    rollout log-probs near −log V (≈ what a fresh model gives, so PPO ratios are near 1 and
    both clipped and unclipped tokens occur); every 3rd sample also carries teacher log-probs
    (kind "both")."""
    vocab = size.hf_config["vocab_size"]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(size.samples):
        n = int(rng.integers(size.min_len, size.max_len + 1))
        resp = int(rng.integers(n // 4, 3 * n // 4 + 1))
        rollout = (-math.log(vocab) + rng.uniform(-0.5, 0.5, resp)).astype(np.float32)
        opd = i % 3 == 0
        teacher = np.minimum(rollout + rng.uniform(-1.0, 1.0, resp), -1e-3).astype(np.float32)
        out.append(Sample(
            sample_id=f"bench-{i}", tokens=rng.integers(1, vocab, n).astype(np.int32),
            response_len=resp, rollout_logp=rollout, reward=float(rng.choice([-1.0, 1.0])),
            kind="both" if opd else "rl", teacher_logp=teacher if opd else None))
    return out


def make_loop(size: BenchSize, workdir: str):
    """A 1-device `TrainLoop` (method "combine": w_rl = w_opd = 1, no KL) for `size`."""
    from clawjax.loop import TrainLoop

    c = base_config()
    c.model.dtype = "float32"
    return TrainLoop(_bench_config(c, size, workdir))


def _bench_config(c, size: BenchSize, workdir: str):
    """`c` with the bench's model, batch and SPEC §6 hyper-parameters, one device, no
    checkpoints, publishing or progress bar."""
    c.workdir = workdir
    c.method = "combine"
    c.model.path = ""
    c.model.hf_config = dict(size.hf_config)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.loss.eps_clip, c.loss.eps_clip_high, c.loss.reduction = EPS_CLIP, EPS_CLIP_HIGH, "sample_mean"
    c.trainer.lr, c.trainer.b1, c.trainer.b2 = LR, B1, B2
    c.trainer.weight_decay, c.trainer.grad_clip = WEIGHT_DECAY, GRAD_CLIP
    c.trainer.samples_per_step = size.samples
    c.trainer.token_budget = size.token_budget
    c.trainer.progress = False
    c.checkpoint.async_save = False
    c.publish.every_steps = 0
    return c


# ---------------------------------------------------------------------------------- torch side
def torch_inputs(batch, device: str = "cpu") -> dict:
    """`TokenBatch [R, L]` (numpy) → torch tensors, with the block-diagonal causal float mask
    `[R, 1, L, L]`: query t sees key s iff s ≤ t and both lie in the same segment (padding,
    segment 0, sees earlier padding only, which keeps it finite and is never scored)."""
    import torch

    seg = torch.as_tensor(np.array(batch.segment_ids), dtype=torch.long)
    length = seg.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    f32 = lambda x: torch.as_tensor(np.array(x), dtype=torch.float32)
    out = dict(
        input_ids=torch.as_tensor(np.array(batch.tokens), dtype=torch.long),
        position_ids=torch.as_tensor(np.array(batch.positions), dtype=torch.long),
        attention_mask=mask[:, None], segment_ids=seg, loss_mask=f32(batch.loss_mask),
        old_logp=f32(batch.old_logp), teacher_logp=f32(batch.teacher_logp),
        teacher_mask=f32(batch.teacher_mask), rewards=f32(batch.rewards))
    return {name: value.to(device) for name, value in out.items()}


def torch_loss(logits, b: dict):
    """The combined PPO/OPD loss in torch: logits `[R, L, V]` → (scalar loss, entropy metric).

    logp[r, t] = log π(tokens[r, t] | row prefix), valid where t and t−1 share a non-padding
    segment. A = r + (teacher_logp − old_logp)·teacher_mask; per token
    max(−ratio·A, −clip(ratio, 1−ε, 1+ε_high)·A); sample_mean: the masked-token mean of each
    (row, segment) with ≥ 1 masked token, averaged over those samples."""
    import torch

    seg = b["segment_ids"]
    rows, length = seg.shape
    logsm = torch.log_softmax(logits[:, :-1].float(), dim=-1)                 # [R, L−1, V]
    logp = torch.gather(logsm, -1, b["input_ids"][:, 1:, None])[..., 0]
    with torch.no_grad():  # reported, not trained (entropy coefficient 0), as clawjax does
        entropy = -(logsm.exp() * logsm).sum(-1)
    valid = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    logp = torch.nn.functional.pad(torch.where(valid, logp, 0.0), (1, 0))      # [R, L]
    mask = (b["loss_mask"] > 0) & (seg > 0)
    old = b["old_logp"]
    logp = torch.where(mask, logp, old)
    adv = torch.where(mask, b["rewards"] + (b["teacher_logp"] - old) * b["teacher_mask"], 0.0)
    ratio = torch.exp(logp - old)
    per_token = torch.maximum(-ratio * adv,
                              -torch.clamp(ratio, 1.0 - EPS_CLIP, 1.0 + EPS_CLIP_HIGH) * adv)
    per_token = torch.where(mask, per_token, 0.0)
    ids = (seg + (length + 1) * torch.arange(rows, device=seg.device)[:, None]).reshape(-1)
    zeros = lambda: torch.zeros(rows * (length + 1), device=seg.device)
    sums = zeros().index_add(0, ids, per_token.reshape(-1))
    counts = zeros().index_add(0, ids, mask.float().reshape(-1))
    has = counts > 0
    loss = (sums[has] / counts[has]).sum() / has.sum().clamp(min=1)
    return loss, entropy


def make_torch_step(model_dir: str, batch,
                    device: str = "cpu") -> tuple[Callable[[], float], object]:
    """`(step, model)`: `step()` runs one eager update on `batch` and returns the loss (computed
    before the update, like the clawjax step's)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa").to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(B1, B2), eps=ADAM_EPS,
                            weight_decay=WEIGHT_DECAY)
    b = torch_inputs(batch, device)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                    attention_mask=b["attention_mask"], use_cache=False)
        loss, _ = torch_loss(out.logits, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        return float(loss.detach())

    return step, model


def train_step(loop, stack) -> Callable[[], float]:
    """`step()`: one update of `loop` (its jitted `_step`) on `stack`, waited for; returns the
    loss (computed before the update)."""
    def step() -> float:
        loop.state, metrics = loop._step(loop.state, stack, loop.ref_params)
        jax.block_until_ready((loop.state, metrics))
        return float(metrics["loss"])

    return step


# ---------------------------------------------------------------------------------- timing
@dataclasses.dataclass
class Timing:
    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)  # process CPU s (all threads)

    def add(self, fn: Callable[[], object]) -> object:
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        self.wall.append(time.perf_counter() - w0)
        self.cpu.append(time.process_time() - c0)
        return out

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def busy_threads(self) -> float:
        """Mean number of busy CPU threads while stepping: CPU seconds / wall seconds."""
        return sum(self.cpu) / max(sum(self.wall), 1e-12)


def bench_one(size: BenchSize, warmup: int, repeats: int, device: str = "cpu") -> dict:
    """Builds both steps for `size`, checks the first-step losses agree, then times them
    alternately. Returns the row's figures."""
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        loop = make_loop(size, os.path.join(tmp, "workdir"))
        try:
            samples = make_samples(size)
            stack = loop.pack(samples)
            host_batch = jax.tree.map(lambda x: np.asarray(x)[0], stack)  # micro-batch 0 of 1
            from clawjax import model as model_lib

            model_dir = os.path.join(tmp, "hf")
            model_lib.save_pretrained(loop.model(), loop.model_config, model_dir,
                                      dtype=jnp.float32)
            torch_step, _ = make_torch_step(model_dir, host_batch, device)

            jax_step = train_step(loop, stack)

            compile_start = time.perf_counter()
            loss_jax = float(jax_step())  # compiles; the loss is that of the initial params
            compile_s = time.perf_counter() - compile_start
            loss_torch = torch_step()
            loss_diff = abs(loss_jax - loss_torch)
            for _ in range(max(warmup - 1, 0)):
                jax_step()
                torch_step()
            times = {"clawjax": Timing(), "torch": Timing()}
            for _ in range(repeats * size.repeat_factor):
                times["clawjax"].add(jax_step)
                times["torch"].add(torch_step)
            tokens = sum(len(s.tokens) for s in samples)
            rows, length = host_batch.tokens.shape
        finally:
            loop.close()
    return dict(name=size.name, size=size, tokens=tokens, slots=rows * length, rows=rows,
                length=length, loss_jax=loss_jax, loss_torch=loss_torch, loss_diff=loss_diff,
                compile_s=compile_s, jax=times["clawjax"], torch=times["torch"])


def describe(cfg: dict) -> str:
    return (f"V={cfg['vocab_size']} D={cfg['hidden_size']} F={cfg['intermediate_size']} "
            f"layers={cfg['num_hidden_layers']} heads={cfg['num_attention_heads']}/"
            f"{cfg['num_key_value_heads']}x{cfg['head_dim']}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m clawjax.bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps per side, the first (compile, loss check) included")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed steps per side (×4 for the tiny size)")
    parser.add_argument("--quick", action="store_true",
                        help="smallest sizes and 2 timed steps, for a smoke run")
    parser.add_argument("--only", choices=("tiny", "small"), help="run one size")
    parser.add_argument("--mfu", choices=("auto", "on", "off", "only"), default="auto",
                        help="the Qwen3-0.6B MFU table: auto = on a GPU/TPU only")
    parser.add_argument("--mfu-attention", default=None,
                        help="comma-separated model.attention values for the MFU rows "
                             "(default: xla, and pallas_gpu on a GPU / pallas_tpu on a TPU)")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats = 1, 2
    if args.warmup < 1 or args.repeats < 1:
        parser.error(f"--warmup = {args.warmup}, --repeats = {args.repeats}: expected ≥ 1 each")

    import torch

    platform = jax.devices()[0].platform
    mfu = args.mfu in ("on", "only") or (args.mfu == "auto" and platform != "cpu")
    if args.mfu == "only":
        from clawjax.bench._mfu import run_mfu
        run_mfu(args)
        return 0
    device = "cuda" if platform == "gpu" and torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    sizes = [s for s in bench_sizes(args.quick) if args.only in (None, s.name)]
    print(f"bench train: float32 on {platform} ({len(os.sched_getaffinity(0))} "
          f"schedulable cores), method=combine, AdamW lr={LR} β=({B1}, {B2}) "
          f"wd={WEIGHT_DECAY} clip={GRAD_CLIP}; {args.warmup} warm-up + {args.repeats} timed "
          "steps per side (tiny: ×4 unless --quick), alternating, medians")
    print(f"torch {torch.__version__} on {device}: eager, attn_implementation=sdpa with a 4-D "
          "block-diagonal causal mask, torch.set_num_threads left at its default = "
          f"{torch.get_num_threads()}; jax {jax.__version__} on {jax.devices()[0].device_kind}"
          + (": XLA CPU default intra-op pool (one thread per schedulable core)"
             if platform == "cpu" else "; float32 products at full precision on both sides"))
    with jax.default_matmul_precision("highest"):
        results = [bench_one(s, args.warmup, args.repeats, device) for s in sizes]
    table, ok = [], True
    for r in results:
        print(f"{r['name']}: {describe(r['size'].hf_config)}; {r['size'].samples} samples packed "
              f"into R×L = {r['rows']}×{r['length']} = {r['slots']} slots; "
              f"first-step loss clawjax={r['loss_jax']:.7f} torch={r['loss_torch']:.7f} "
              f"|diff|={r['loss_diff']:.2e}; clawjax compile+first step {r['compile_s']:.1f} s")
        ok &= r["loss_diff"] <= LOSS_TOLERANCE * max(1.0, abs(r["loss_torch"]))
        jax_tps = r["tokens"] / r["jax"].median
        torch_tps = r["tokens"] / r["torch"].median
        table.append([r["name"], r["tokens"], f"{jax_tps:.0f}", f"{torch_tps:.0f}",
                      f"{jax_tps / torch_tps:.2f}x",
                      f"{r['jax'].busy_threads:.2f}", f"{r['torch'].busy_threads:.2f}"])
    print_table(["config", "tokens/step", "clawjax tok/s", "torch tok/s", "ratio",
                 "clawjax busy threads", "torch busy threads"], table)
    print("ratio = clawjax / torch tokens per second (target ≥ 1.5x); busy threads = process "
          "CPU seconds / wall seconds during the timed steps")
    cores = len(os.sched_getaffinity(0))
    busy = [min(r["jax"].busy_threads, r["torch"].busy_threads) for r in results]
    if device == "cpu" and any(b < 0.75 * cores for b in busy):
        print(f"note: busy threads well below the {cores} cores: the CPU was shared with other "
              "work during timing; eager torch (OpenMP) slows down more than XLA under "
              "contention, so these ratios overstate the uncontended one")
    if mfu:
        from clawjax.bench._mfu import run_mfu
        run_mfu(args)
    if not ok:
        print(f"FAILED: first-step losses differ by more than {LOSS_TOLERANCE} × max(1, |loss|)")
        return 1
    return 0
