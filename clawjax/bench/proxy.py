"""`python -m clawjax.bench proxy`: the latency the rollout proxy adds over calling the policy
server directly, p50/p99 at 1 and 32 concurrent sessions (target: added p50 < 5 ms).

Everything runs as subprocesses on loopback: the embedded policy server (`python -m
clawjax.serve`, a tiny random Qwen3 with the local tokenizer unless `--model-dir`), the rule
judge, a gRPC buffer (fsync on), and the proxy (`python -m clawjax.rollout serve --method
combine`). This process is the client (httpx, asyncio).

A session sends `--turns` chat requests one after another, each one a next state of the last
("Thanks. Next: ..."), so the judge loop, teacher scoring and buffer pushes run in the proxy
while it serves, as in production. Baseline: the same requests straight to the policy server's
own `/v1/chat/completions` (which also applies the chat template; `logprobs: true` so it returns
the per-token log-probs the proxy asks for). Every request generates exactly `--max-tokens`
tokens greedily (`ignore_eos`). Rounds alternate direct / proxy (after an uncounted warm-up of
each) so load changes on a shared host hit both alike. Printed: p50 and p99 of per-request
latency for each path, the added p50 / p99 (proxy − direct), and the ratio proxy / direct.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from clawjax.bench.common import print_table


def make_model_dir(path: str) -> str:
    """A tiny random Qwen3 (hidden 64, 2 layers) over the local tokenizer, saved as HF files."""
    import jax.numpy as jnp

    from clawjax import model as cm
    from clawjax.tokenizer import build_tokenizer, save_tokenizer

    tok = build_tokenizer()
    config = cm.ModelConfig(model_type="qwen3", vocab_size=len(tok), hidden_size=64,
                            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, qk_norm=True,
                            max_position_embeddings=1024,
                            extra={"eos_token_id": tok.eos_token_id})
    cm.save_pretrained(cm.init_random(config, 0), config, path, dtype=jnp.float32)
    save_tokenizer(tok, path)
    return path


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], ready: str, timeout: float = 300.0) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", *cmd], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline, lines = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if ready in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd)} did not start:\n{''.join(lines[-30:])}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


async def run_sessions(url: str, sessions: int, turns: int, max_tokens: int, tag: str,
                       proxy: bool) -> list[float]:
    """Per-request latencies (seconds) of `sessions` concurrent sessions of `turns` turns."""
    import httpx

    async def session(client, i: int) -> list[float]:
        messages = [{"role": "user", "content": f"Session {i}: what is {i} + 1?"}]
        out = []
        for t in range(turns):
            body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": True}
            if proxy:
                body.update(session_id=f"{tag}-{i}", session_done=t == turns - 1)
            else:
                body["logprobs"] = True
            start_t = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=body)
            out.append(time.perf_counter() - start_t)
            if r.status_code != 200:
                raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
            text = r.json()["choices"][0]["message"]["content"]
            messages = messages + [{"role": "assistant", "content": text},
                                   {"role": "user", "content": f"Thanks. Next: {t} + {i}?"}]
        return out

    limits = httpx.Limits(max_connections=sessions + 8, max_keepalive_connections=sessions + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        per = await asyncio.gather(*(session(client, i) for i in range(sessions)))
    return [x for xs in per for x in xs]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m clawjax.bench proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=None, help="default: a tiny random Qwen3")
    p.add_argument("--concurrency", default="1,32", help="comma-separated session counts")
    p.add_argument("--turns", type=int, default=8, help="requests per session per round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per path")
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    work = tempfile.mkdtemp(prefix="bench-proxy-")
    model_dir = args.model_dir or make_model_dir(os.path.join(work, "model"))
    ports = {k: free_port() for k in ("policy", "judge", "buffer", "proxy")}
    procs = []
    try:
        procs.append(start(["clawjax.serve", "--model", model_dir, "--port",
                            str(ports["policy"]), "--max-batch", str(max(levels)),
                            "--context-length", "1024"], "READY"))
        procs.append(start(["clawjax.rollout.rule_judge", "--port", str(ports["judge"])],
                           "READY"))
        procs.append(start(["clawjax.buffer", "serve", "--dir", os.path.join(work, "buf"),
                            "--port", str(ports["buffer"])], "listening on"))
        procs.append(start(["clawjax.rollout", "serve", "--port", str(ports["proxy"]),
                            "--model-dir", model_dir, "--policy-url",
                            f"http://127.0.0.1:{ports['policy']}", "--judge-url",
                            f"http://127.0.0.1:{ports['judge']}", "--buffer",
                            f"127.0.0.1:{ports['buffer']}", "--method", "combine",
                            "--log-level", "warning"], "READY"))
        urls = {"direct": f"http://127.0.0.1:{ports['policy']}",
                "proxy": f"http://127.0.0.1:{ports['proxy']}"}
        rows = []
        for n in levels:
            lat: dict[str, list[float]] = {"direct": [], "proxy": []}
            for rnd in range(args.rounds + 1):  # round 0 warms up (compiles, connects)
                for path in ("direct", "proxy"):
                    got = asyncio.run(run_sessions(urls[path], n, args.turns, args.max_tokens,
                                                   f"c{n}r{rnd}", path == "proxy"))
                    if rnd:
                        lat[path].extend(got)
            d50, d99 = (float(np.percentile(lat["direct"], q)) * 1e3 for q in (50, 99))
            p50, p99 = (float(np.percentile(lat["proxy"], q)) * 1e3 for q in (50, 99))
            rows.append([n, len(lat["proxy"]), f"{d50:.2f}", f"{d99:.2f}", f"{p50:.2f}",
                         f"{p99:.2f}", f"{p50 - d50:+.2f}", f"{p99 - d99:+.2f}",
                         f"{p50 / d50:.3f}"])
        import httpx
        stats = httpx.get(urls["proxy"] + "/stats", params={"idle_timeout": 120},
                          timeout=180).json()
        print(f"proxy latency, {args.max_tokens} greedy tokens per request (ms; "
              f"ratio = proxy p50 / direct p50)")
        print_table(["sessions", "requests", "direct p50", "direct p99", "proxy p50",
                     "proxy p99", "added p50", "added p99", "ratio"], rows)
        print(f"judge loop while serving: emitted {stats['emitted']}, drops {stats['drops']}, "
              f"pushed {stats['push']['pushed']}")
    finally:
        for proc in reversed(procs):
            stop(proc)
    return 0
