"""The MFU tables of `python -m clawjax.bench train` (on a GPU or TPU, or with `--mfu`).

The product's jitted step on `configs/qwen3_0_6b.py` with Qwen3-0.6B's shape (random weights,
samples of 1024–4096 tokens): model FLOPs per step (`clawjax.bench._flops`) / the median step
time, against the datasheet bf16 peak and against an n³ bf16 matrix product timed in the same
process. One table per `model.attention` implementation.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from clawjax.bench import _flops as flops_lib
from clawjax.bench.common import print_table
from clawjax.bench.train import (QWEN3_0_6B, BenchSize, Timing, _bench_config, describe,
                                 make_samples, train_step)
from clawjax.sample import Sample


def mfu_samples(hf_config: dict, count: int, min_len: int, max_len: int,
                seed: int = 0) -> list[Sample]:
    """`make_samples` for the MFU row: `count` samples of `min_len..max_len` tokens."""
    size = BenchSize("mfu", hf_config, samples=count, token_budget=max_len, min_len=min_len,
                     max_len=max_len)
    return make_samples(size, seed)


def matmul_flops_per_s(n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of an n×n×n bf16 matrix product on JAX's default device (random operands,
    median of `repeats` after a warm-up): the attainable ceiling beside the datasheet's."""
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys)
    product = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(product(a, b))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(product(a, b))
        times.append(time.perf_counter() - start)
    return 2.0 * n ** 3 / statistics.median(times)


def bench_mfu(warmup: int, repeats: int, min_len: int = 1024, max_len: int = 4096,
              hf_config: dict = QWEN3_0_6B, trainer_overrides: dict | None = None,
              matmul_n: int = 8192, attention: str = "xla") -> dict:
    """Times the product's step on `configs/qwen3_0_6b.py` with Qwen3-0.6B's shape (random
    weights; `hf_config` / `trainer_overrides` shrink it for a smoke test); returns the MFU
    row's figures."""
    from clawjax.configs import qwen3_0_6b
    from clawjax.loop import TrainLoop

    c = qwen3_0_6b.get_config()
    c.trainer.update(trainer_overrides or {})
    c.model.attention = attention
    size = BenchSize("qwen3-0.6b", hf_config, samples=c.trainer.samples_per_step,
                     token_budget=c.trainer.token_budget, min_len=min_len, max_len=max_len)
    with tempfile.TemporaryDirectory(prefix="bench-mfu-") as tmp:
        loop = TrainLoop(_bench_config(c, size, os.path.join(tmp, "workdir")))
        try:
            samples = mfu_samples(hf_config, size.samples, min_len, max_len)
            stack = loop.pack(samples)

            step = train_step(loop, stack)
            compile_start = time.perf_counter()
            loss = step()
            compile_s = time.perf_counter() - compile_start
            for _ in range(max(warmup - 1, 0)):
                step()
            timing = Timing()
            for _ in range(repeats):
                timing.add(step)
        finally:
            loop.close()
    lengths = [len(s.tokens) for s in samples]
    step_flops = flops_lib.train_step_flops(hf_config, lengths,
                                            [s.response_len for s in samples])
    kind = jax.devices()[0].device_kind
    return dict(kind=kind, config=c, hf_config=hf_config, tokens=sum(lengths), loss=loss,
                compile_s=compile_s, timing=timing, step_flops=step_flops,
                peak=flops_lib.peak_bf16_flops(kind),
                matmul=matmul_flops_per_s(matmul_n), matmul_n=matmul_n,
                stack_shape=tuple(stack.tokens.shape))


def _mfu_label(r: dict) -> str:
    shape = "qwen3-0.6b" if r["hf_config"] == QWEN3_0_6B else "shrunken"
    return f"{shape} {r['config'].model.attention}"


def print_mfu(r: dict) -> None:
    c, seconds = r["config"], r["timing"].median
    achieved = r["step_flops"] / seconds
    shape = "Qwen3-0.6B" if r["hf_config"] == QWEN3_0_6B else describe(r["hf_config"])
    print(f"MFU, {shape} shape on {r['kind']}: configs/qwen3_0_6b.py (dtype={c.model.dtype}, "
          f"remat={c.model.remat}, micro_batches={c.trainer.micro_batches}, "
          f"attention={c.model.attention}); "
          f"{c.trainer.samples_per_step} samples = {r['tokens']} tokens packed as "
          f"[micro, R, L] = {list(r['stack_shape'])}; first loss {r['loss']:.5f}; "
          f"compile+first step {r['compile_s']:.1f} s")
    peak = "unknown device: no datasheet peak" if r["peak"] is None else (
        f"{achieved / r['peak']:.1%} of {r['peak'] / 1e12:.0f} TFLOP/s (datasheet bf16)")
    print_table(["config", "step s (median)", "tokens/s", "model TFLOP/step",
                 "achieved TFLOP/s", "MFU", "of measured matmul peak"],
                [[_mfu_label(r), f"{seconds:.3f}", f"{r['tokens'] / seconds:.0f}",
                  f"{r['step_flops'] / 1e12:.1f}", f"{achieved / 1e12:.1f}", peak,
                  f"{achieved / r['matmul']:.1%} of {r['matmul'] / 1e12:.1f} TFLOP/s "
                  f"({r['matmul_n']}³ bf16)"]])
    print("model FLOPs: clawjax.bench._flops (6·P_body·tokens + causal attention + LM head at "
          "scored positions; rematerialisation and padding not counted)")


def run_mfu(args) -> None:
    """One MFU table per `--mfu-attention` implementation (each compiled and timed alone)."""
    kernel_rows = {"gpu": "xla,pallas_gpu", "tpu": "xla,pallas_tpu"}
    names = args.mfu_attention or kernel_rows.get(jax.default_backend(), "xla")
    for name in names.split(","):
        print_mfu(bench_mfu(args.warmup, args.repeats, attention=name.strip()))
