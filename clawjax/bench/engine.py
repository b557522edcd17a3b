"""`python -m clawjax.bench engine`: the embedded server's jitted steps vs the naive ones.

The engine keeps a fixed KV cache of `--max-batch` rows × `--context` slots. The naive steps
(the baseline, built here from the same model) run every row of the cache and attend every
slot; the engine's steps (`clawjax.serving.steps`) prefill only the admitted rows and attend a
power-of-two window of slots that covers the sequences. Both donate the cache, both return the
log-probs to the host, on the default task's policy shape (a tiny Qwen3, random weights).

Cases (median ms per call over interleaved rounds; ratio = naive / engine; the last column is
the largest log-prob difference between the two on the same inputs, a check that the fast
path computes the same thing):
  prefill 1 of 8   one request admitted while the other rows are busy (the common case)
  prefill 8 of 8   a full batch admitted at once
  decode 8 rows    one decode step of every row, the longest at position `--prompt + 16`

    python -m clawjax.bench engine [--prompt 128] [--max-batch 8] [--context 1024]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clawjax import model as model_lib
from clawjax.bench.common import print_table
from clawjax.serving.steps import bucket, make_steps


def policy_config(vocab: int, hidden: int, layers: int, context: int) -> model_lib.ModelConfig:
    """A Qwen3 of the default task's policy shape (`configs/default.py` warm start)."""
    return model_lib.ModelConfig.from_hf(dict(
        model_type="qwen3", vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden // 4, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=context, tie_word_embeddings=True))


def naive_steps(graphdef):
    """The baseline: prefill and decode over every cache row, attending every slot."""

    def prefill(state, cache, tokens, positions):
        logits, cache = nnx.merge(graphdef, state).forward_cached(tokens, positions, cache)
        return cache, jax.nn.log_softmax(logits, axis=-1)  # [B,T,V]

    def decode(state, cache, tokens, positions):
        logits, cache = nnx.merge(graphdef, state).forward_cached(tokens, positions, cache)
        return cache, jax.nn.log_softmax(logits[:, 0], axis=-1)  # [B,V]

    return jax.jit(prefill, donate_argnums=(1,)), jax.jit(decode, donate_argnums=(1,))


def time_cache_threaded(calls: dict, cache_of: dict, rounds: int, per_round: int) -> dict:
    """Median ms per call of each `calls[name](cache) -> (cache, *outputs)`, threading its own
    (donated) cache, alternating names round by round; outputs are fetched to the host."""
    caches = dict(cache_of)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds + 1):  # round 0 compiles and warms up
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(per_round):
                caches[name], *outs = call(caches[name])
                jax.device_get(outs)
            if r:
                samples[name].append((time.perf_counter() - start) / per_round * 1e3)
    return {name: statistics.median(ms) for name, ms in samples.items()}


def measure(prompt: int, max_batch: int, context: int, hidden: int, layers: int, vocab: int,
            rounds: int) -> list[dict]:
    config = policy_config(vocab, hidden, layers, context)
    model = model_lib.init_random(config, seed=0)
    graphdef, state = nnx.split(model)
    fast_prefill, fast_decode = make_steps(graphdef)
    slow_prefill, slow_decode = naive_steps(graphdef)
    new_cache = lambda: model.init_cache(max_batch, context, jnp.float32)
    rng = np.random.default_rng(0)
    t = bucket(prompt, context)
    rows_out = []
    for admitted in (1, max_batch):
        b = bucket(admitted, max_batch, least=1)
        full_tok = np.zeros((max_batch, t), np.int32)
        full_pos = np.full((max_batch, t), -1, np.int32)
        full_tok[:admitted, :prompt] = rng.integers(0, vocab, (admitted, prompt))
        full_pos[:admitted, :prompt] = np.arange(prompt)
        tok, pos = full_tok[:b], full_pos[:b]
        rows = np.arange(b, dtype=np.int32)
        targets = np.zeros_like(tok)
        last = np.full((b,), prompt - 1, np.int32)
        times = time_cache_threaded(
            {"naive": lambda c: slow_prefill(state, c, full_tok, full_pos),
             "engine": lambda c: fast_prefill(state, c, rows, tok, pos, targets, last, k=0)},
            {"naive": new_cache(), "engine": new_cache()}, rounds, per_round=5)
        naive_logp = np.asarray(slow_prefill(state, new_cache(), full_tok, full_pos)[1])
        engine_last = np.asarray(fast_prefill(state, new_cache(), rows, tok, pos, targets,
                                              last, k=0)[1])
        diff = np.abs(naive_logp[:admitted, prompt - 1] - engine_last[:admitted]).max()
        rows_out.append({"case": f"prefill {admitted} of {max_batch} (T={t})", **times,
                         "diff": float(diff)})
    position = prompt + 16
    tok = rng.integers(0, vocab, (max_batch, 1)).astype(np.int32)
    pos = np.full((max_batch, 1), position, np.int32)
    window = bucket(position + 1, context)
    times = time_cache_threaded(
        {"naive": lambda c: slow_decode(state, c, tok, pos),
         "engine": lambda c: fast_decode(state, c, tok, pos, window=window)},
        {"naive": new_cache(), "engine": new_cache()}, rounds, per_round=20)
    diff = np.abs(np.asarray(slow_decode(state, new_cache(), tok, pos)[1])
                  - np.asarray(fast_decode(state, new_cache(), tok, pos, window=window)[1])).max()
    rows_out.append({"case": f"decode {max_batch} rows (window {window} of {context})", **times,
                     "diff": float(diff)})
    for row in rows_out:
        row["ratio"] = row["naive"] / row["engine"]
    return rows_out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m clawjax.bench engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--max-batch", type=int, default=8, help="KV-cache rows")
    parser.add_argument("--context", type=int, default=1024, help="KV-cache slots per row")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=101)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per case")
    args = parser.parse_args(argv)
    for name in ("prompt", "max_batch", "context", "hidden", "layers", "vocab", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    if args.prompt + 17 > args.context:
        parser.error(f"--prompt {args.prompt}: expected <= --context - 17 = {args.context - 17}")
    if args.hidden % 4:
        parser.error(f"--hidden {args.hidden}: expected a multiple of 4 (4 heads)")
    rows = measure(args.prompt, args.max_batch, args.context, args.hidden, args.layers,
                   args.vocab, args.rounds)
    print(f"\nbench engine on {jax.devices()[0].platform}: {args.layers} layers, hidden "
          f"{args.hidden}, {args.max_batch} cache rows x {args.context} slots")
    print_table(["case", "naive ms", "engine ms", "naive / engine", "max |logp diff|"],
                [[r["case"], f"{r['naive']:.2f}", f"{r['engine']:.2f}", f"{r['ratio']:.2f}x",
                  f"{r['diff']:.1e}"] for r in rows])
    return 0
