"""`python -m clawjax.bench loss`: chunked log-probs + combined loss vs full logits.

A Qwen3-0.6B-sized head (D = 1024, V = 151,936) over R × L = 2 × 2048 packed tokens, float32:
forward + backward (gradients to hidden and lm_head) of
`combined_loss(sequence_logp_and_entropy(...))` against the naive version that builds the
`[R, L, V]` logits, in one process. Prints compiled peak / working memory and median time of
both and the ratios (targets: ≥ 8× less memory at ≤ 1.1× the time).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from clawjax import losses
from clawjax.batch import Sample, TokenBatch, pack
from clawjax.bench.common import compile_with_memory, fmt_bytes, print_table, time_interleaved

CONFIG = losses.LossConfig(entropy_coef=1e-3)


def naive_sequence_logp_and_entropy(hidden, lm_head, tokens, segment_ids):
    """Baseline: full `[R, L−1, V]` float32 logits, log-softmax, gather, entropy."""
    logits = jnp.einsum("RLD,DV->RLV", hidden[:, :-1], lm_head)
    logsm = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logsm, tokens[:, 1:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logsm) * logsm, axis=-1)
    valid = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    pad = ((0, 0), (1, 0))
    return (jnp.pad(jnp.where(valid, logp, 0.0), pad),
            jnp.pad(jnp.where(valid, entropy, 0.0), pad))


def make_batch(rows: int, length: int, vocab: int, seed: int = 0) -> TokenBatch:
    """Random OPD+RL samples (lengths L/2, L/4, L/8, L/8 − 8 per row) packed into `rows` rows."""
    rng = np.random.default_rng(seed)
    samples = []
    for r in range(rows):
        for n in (length // 2, length // 4, length // 8, length // 8 - 8):
            if n < 4:
                continue
            resp = int(rng.integers(n // 2, n - 1))
            samples.append(Sample(
                sample_id=f"r{r}-{len(samples)}", tokens=rng.integers(0, vocab, n),
                response_len=resp, rollout_logp=-rng.exponential(2.0, resp),
                teacher_logp=-rng.exponential(2.0, resp), kind="both",
                reward=float(rng.choice([-1.0, 1.0]))))
    (batch,) = pack(samples, length, row_buckets=(rows,))
    return batch


def loss_step(sequence_fn):
    def step(hidden, lm_head, batch):
        def loss_fn(h, w):
            logp, entropy = sequence_fn(h, w, batch.tokens, batch.segment_ids)
            return losses.combined_loss(logp, batch, CONFIG, entropy)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            hidden, lm_head)
        return loss, grads
    return step


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m clawjax.bench loss", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk", type=int, default=256,
                        help="vocabulary columns per logits block (token_logp_and_entropy chunk)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed rounds (executables are compiled before timing)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (L=512, V=32768) for a fast smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.length, args.vocab = 512, 32768

    rng = np.random.default_rng(0)
    batch = jax.device_put(make_batch(args.rows, args.length, args.vocab))
    hidden = jnp.asarray(rng.normal(size=(args.rows, args.length, args.hidden)), jnp.float32)
    lm_head = jnp.asarray(rng.normal(size=(args.hidden, args.vocab)) / np.sqrt(args.hidden),
                          jnp.float32)
    chunk = args.chunk

    def chunked_fn(h, w, tokens, segment_ids):
        return losses.sequence_logp_and_entropy(h, w, tokens, segment_ids, chunk=chunk)

    print(f"bench loss: D={args.hidden} V={args.vocab} R×L={args.rows}×{args.length} float32 "
          f"on {jax.devices()[0].platform}, chunk={chunk}, fwd+bwd of combined_loss")
    fns, mem = {}, {}
    for name, seq in (("naive", naive_sequence_logp_and_entropy), ("chunked", chunked_fn)):
        fns[name], mem[name] = compile_with_memory(loss_step(seq), hidden, lm_head, batch)
    (l_naive, g_naive), (l_chunk, g_chunk) = (fns[n](hidden, lm_head, batch) for n in fns)
    agree = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
                for a, b in zip(g_naive, g_chunk))
    times = time_interleaved(fns, {n: (hidden, lm_head, batch) for n in fns},
                             warmup=args.warmup, repeats=args.repeats)
    rows = [[name, fmt_bytes(mem[name].peak), fmt_bytes(mem[name].temp), f"{times[name]:.3f}"]
            for name in fns]
    print_table(["version", "peak memory", "working (temp) memory", "median time s"], rows)
    print(f"loss naive={float(l_naive):.6f} chunked={float(l_chunk):.6f}; "
          f"max relative gradient difference {agree:.2e}")
    print(f"peak memory ratio naive/chunked: {mem['naive'].peak / mem['chunked'].peak:.2f}x "
          f"(working memory {mem['naive'].temp / max(mem['chunked'].temp, 1):.2f}x; target ≥ 8x)")
    print(f"time ratio chunked/naive: {times['chunked'] / times['naive']:.3f}x (target ≤ 1.1x)")
    return 0
