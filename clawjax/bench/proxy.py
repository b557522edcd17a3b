"""`python -m clawjax.bench proxy`: the latency the rollout proxy adds over calling the policy
server directly, p50/p99 at 1 and 32 concurrent sessions (target: added p50 < 5 ms).

Everything runs as subprocesses on loopback: the embedded policy server (`python -m
clawjax.serve`, a tiny random Qwen3 with the local tokenizer unless `--model-dir`), the rule
judge, a gRPC buffer (fsync on), and the proxy (`python -m clawjax.rollout serve --method
combine`). This process is the client (httpx, asyncio).

Each concurrency level gets fresh servers (the policy server with as many KV slots as
sessions). A session sends `--turns` chat requests one after another, each one a next state of
the last ("Thanks. Now ..."), so the judge loop and buffer pushes run in the proxy while it
serves, as in production. Every turn is sent twice, back to back: first straight to the policy
server's own `/v1/chat/completions` (the baseline; it applies the chat template too, and
`logprobs: true` makes it return the per-token log-probs the proxy asks for), then unchanged
through the proxy, so both paths see the same load on a shared host. Every request generates
exactly `--max-tokens` tokens greedily (`ignore_eos`); one uncounted round warms up. Printed: p50
and p99 of per-request latency for each path, the added p50 / p99 (proxy − direct), the ratio
proxy / direct, and the proxy's own time per request (its Server-Timing header: everything
but the wait on the policy server).
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


async def run_sessions(urls: dict[str, str], sessions: int, turns: int, max_tokens: int,
                       tag: str) -> dict[str, list[float]]:
    """`sessions` concurrent sessions of `turns` turns; each turn is sent to the policy server
    directly and then, unchanged, through the proxy (paired, so both see the same load).
    Returns per-request latencies (seconds) by path, and the proxy's own time (`own`, from its
    Server-Timing header)."""
    import httpx

    out: dict[str, list[float]] = {"direct": [], "proxy": [], "own": [], "upstream": []}

    async def call(client, url: str, body: dict) -> tuple[float, httpx.Response]:
        start_t = time.perf_counter()
        r = await client.post(url + "/v1/chat/completions", json=body)
        took = time.perf_counter() - start_t
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
        return took, r

    async def session(client, i: int) -> None:
        messages = [{"role": "user", "content": f"Session {i}: what is {i} + 1?"}]
        for t in range(turns):
            body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": True}
            took, _ = await call(client, urls["direct"], {**body, "logprobs": True})
            out["direct"].append(took)
            took, r = await call(client, urls["proxy"], {
                **body, "session_id": f"{tag}-{i}", "session_done": t == turns - 1})
            out["proxy"].append(took)
            timing = dict(part.strip().split(";dur=") for part in
                          r.headers["Server-Timing"].split(","))
            out["own"].append(float(timing["proxy"]) / 1e3)
            out["upstream"].append(float(timing["upstream"]) / 1e3)
            text = r.json()["choices"][0]["message"]["content"]
            messages = messages + [{"role": "assistant", "content": text},
                                   {"role": "user", "content": f"Thanks. Now {t} + {i}?"}]

    limits = httpx.Limits(max_connections=2 * sessions + 8,
                          max_keepalive_connections=2 * sessions + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(session(client, i) for i in range(sessions)))
    return out


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3


def measure(model_dir: str, work: str, n: int, args) -> list:
    """One concurrency level: fresh servers (policy with `n` KV slots), warm-up, rounds."""
    ports = {k: free_port() for k in ("policy", "judge", "buffer", "proxy")}
    procs = []
    try:
        procs.append(start(["clawjax.serve", "--model", model_dir, "--port",
                            str(ports["policy"]), "--max-batch", str(n),
                            "--context-length", str(args.context_length)], "READY"))
        procs.append(start(["clawjax.rollout.rule_judge", "--port", str(ports["judge"])],
                           "READY"))
        procs.append(start(["clawjax.buffer", "serve", "--dir",
                            os.path.join(work, f"buf{n}"), "--port", str(ports["buffer"])],
                           "listening on"))
        procs.append(start(["clawjax.rollout", "serve", "--port", str(ports["proxy"]),
                            "--model-dir", model_dir, "--policy-url",
                            f"http://127.0.0.1:{ports['policy']}", "--judge-url",
                            f"http://127.0.0.1:{ports['judge']}", "--buffer",
                            f"127.0.0.1:{ports['buffer']}", "--method", "combine",
                            "--log-level", "warning"], "READY"))
        urls = {"direct": f"http://127.0.0.1:{ports['policy']}",
                "proxy": f"http://127.0.0.1:{ports['proxy']}"}
        lat: dict[str, list[float]] = {"direct": [], "proxy": [], "own": [], "upstream": []}
        for rnd in range(args.rounds + 1):  # round 0 warms up (compiles, connects)
            got = asyncio.run(run_sessions(urls, n, args.turns, args.max_tokens, f"r{rnd}"))
            if rnd:
                for k in lat:
                    lat[k].extend(got[k])
        import httpx
        stats = httpx.get(urls["proxy"] + "/stats", params={"idle_timeout": 120},
                          timeout=180).json()
        print(f"  {n} sessions: judge loop emitted {stats['emitted']}, pushed "
              f"{stats['push']['pushed']}, drops {stats['drops']}", flush=True)
        d50, d99, p50, p99 = (ms(lat["direct"], 50), ms(lat["direct"], 99),
                              ms(lat["proxy"], 50), ms(lat["proxy"], 99))
        return [n, len(lat["proxy"]), f"{d50:.2f}", f"{d99:.2f}", f"{p50:.2f}", f"{p99:.2f}",
                f"{p50 - d50:+.2f}", f"{p99 - d99:+.2f}", f"{p50 / d50:.3f}",
                f"{ms(lat['own'], 50):.2f}", f"{ms(lat['own'], 99):.2f}",
                f"{ms(lat['upstream'], 50):.2f}"]
    finally:
        for proc in reversed(procs):
            stop(proc)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m clawjax.bench proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=None, help="default: a tiny random Qwen3")
    p.add_argument("--concurrency", default="1,32", help="comma-separated session counts")
    p.add_argument("--turns", type=int, default=6, help="requests per session per round")
    p.add_argument("--context-length", type=int, default=512,
                   help="policy server context (its decode cost grows with slots x context)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per path")
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    work = tempfile.mkdtemp(prefix="bench-proxy-")
    model_dir = args.model_dir or make_model_dir(os.path.join(work, "model"))
    rows = [measure(model_dir, work, n, args) for n in levels]
    print(f"proxy latency, {args.max_tokens} greedy tokens per request (ms; ratio = proxy p50 /"
          " direct p50; own = the proxy's own time from its Server-Timing header)")
    print_table(["sessions", "requests", "direct p50", "direct p99", "proxy p50", "proxy p99",
                 "added p50", "added p99", "ratio", "own p50", "own p99", "upstream p50"], rows)
    return 0
