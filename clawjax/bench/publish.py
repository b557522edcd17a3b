"""`python -m clawjax.bench publish`: what publishing costs.

1. Export throughput: one publish's export (the `maybe_publish` call — the on-device snapshot,
   cast to bfloat16 in HF layout — plus the background write the publisher times as
   `last_write_s`: device→host, HF safetensors + config.json, fsync, atomic rename) in MB/s of
   safetensors written, against a raw write of the same bytes in the same run: `numpy.save` of
   the same bfloat16 arrays, one file each, fsynced. Removing older versions (`publish.keep`)
   is left out of both sides, as the raw files' removal is. Medians over rounds in which the
   two sides take turns going first. Target: ratio >= 0.7.
2. Weight-update stall: the embedded server serves streamed requests from several clients
   while `/update_weights_from_disk` swaps its weights repeatedly; the longest wait a request
   sees (time to the first token, or between two tokens) during updates, against the same
   figure without updates in the same run. Target: < 1 s for the tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clawjax import model as cm
from clawjax.bench.common import print_table
from clawjax.publish import Publisher


def model_config(hidden: int, layers: int, vocab: int) -> cm.ModelConfig:
    heads = max(2, hidden // 64)
    return cm.ModelConfig.from_hf(dict(
        model_type="qwen3", vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
        head_dim=64, max_position_embeddings=512, tie_word_embeddings=False))


def raw_write(arrays: list[np.ndarray], out: Path) -> int:
    out.mkdir(parents=True)
    total = 0
    for i, a in enumerate(arrays):
        path = out / f"{i}.npy"
        with open(path, "wb") as f:
            np.save(f, a)
            f.flush()
            os.fsync(f.fileno())
        total += a.nbytes
    return total


def warm_page_pool(root: Path, nbytes: int) -> None:
    """Writes, fsyncs and deletes `nbytes` of scratch data: on a fresh VM the first pages the
    page cache takes are faulted in from the host (measured: 5x slower writes), which would
    land on whichever side of the comparison happens to get them first."""
    scratch = root / "scratch.bin"
    block = np.zeros(1 << 24, np.uint8)
    with open(scratch, "wb") as f:
        for _ in range(-(-nbytes // block.nbytes)):
            f.write(block.data)
        f.flush()
        os.fsync(f.fileno())
    scratch.unlink()


def bench_export(config, repeats: int, root: Path) -> list[list]:
    model = cm.init_random(config, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    host = [np.asarray(jax.device_get(x)).astype(jnp.bfloat16)
            for x in jax.tree.leaves(params)]
    warm_page_pool(root, 4 * sum(a.nbytes for a in host))
    pub = Publisher(None, root / "publish", every_steps=1, keep=2, dtype=jnp.bfloat16)
    export_s, raw_s, nbytes = [], [], 0

    def export(r: int) -> float:
        t0 = time.perf_counter()
        pub.maybe_publish(r, (graphdef, params), config, policy_version=r)
        snapshot_s = time.perf_counter() - t0
        pub.wait()
        return snapshot_s + pub.stats()["last_write_s"]

    def raw(r: int) -> float:
        t0 = time.perf_counter()
        raw_write(host, root / f"raw{r}")
        return time.perf_counter() - t0

    for r in range(repeats + 1):  # round 0 warms up; the sides take turns going first
        if r % 2:
            e, w = export(r), raw(r)
        else:
            w, e = raw(r), export(r)
        if r:
            export_s.append(e)
            raw_s.append(w)
        nbytes = sum(p.stat().st_size for p in (root / "publish" / f"v{r}").glob("*.safetensors"))
        raw_bytes = sum(p.stat().st_size for p in (root / f"raw{r}").iterdir())
        shutil.rmtree(root / f"raw{r}")
        assert abs(raw_bytes - nbytes) < 1 << 20, (raw_bytes, nbytes)
    assert pub.stats()["failed"] == 0, pub.stats()["last_error"]
    pub.close()
    mb = nbytes / 1e6
    e, w = statistics.median(export_s), statistics.median(raw_s)
    return [["publish export (safetensors bf16)", f"{mb:.1f}", f"{e * 1e3:.1f}", f"{mb / e:.0f}"],
            ["raw numpy.save (same bytes)", f"{mb:.1f}", f"{w * 1e3:.1f}", f"{mb / w:.0f}"],
            ["ratio export / raw", "", "", f"{w / e:.2f}x"]]


def _traffic(url: str, stop: threading.Event, gaps: list[float], prompt: list[int]) -> None:
    body = {"input_ids": prompt, "stream": True,
            "sampling_params": {"max_new_tokens": 32, "ignore_eos": True}}
    with httpx.Client(timeout=120) as http:
        while not stop.is_set():
            last = time.perf_counter()
            with http.stream("POST", url + "/generate", json=body) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data:"):
                        now = time.perf_counter()
                        gaps.append(now - last)
                        last = now


def bench_update_stall(root: Path, clients: int, updates: int, seconds: float) -> list[list]:
    from clawjax.serving.launch import ServerThread, make_context

    config = model_config(hidden=64, layers=2, vocab=128)
    dirs = []
    for seed in (0, 1):
        d = root / f"tiny{seed}"
        cm.save_pretrained(cm.init_random(config, seed=seed), config, d, dtype=jnp.float32)
        dirs.append(d)
    srv = ServerThread(make_context(str(dirs[0]), max_batch=clients, context_len=128)).start()
    prompt = list(range(1, 20))
    rows = []
    try:
        httpx.post(srv.url + "/generate", timeout=120, json={  # compile outside the timing
            "input_ids": prompt, "sampling_params": {"max_new_tokens": 4}})
        for phase in ("no updates", f"{updates} weight updates"):
            stop, gaps = threading.Event(), []
            threads = [threading.Thread(target=_traffic, args=(srv.url, stop, gaps, prompt))
                       for _ in range(clients)]
            for t in threads:
                t.start()
            t0 = time.perf_counter()
            update_s = []
            if phase == "no updates":
                time.sleep(seconds)
            else:
                for i in range(updates):
                    u0 = time.perf_counter()
                    r = httpx.post(srv.url + "/update_weights_from_disk", timeout=120, json={
                        "model_path": str(dirs[(i + 1) % 2]), "weight_version": str(i + 1)})
                    assert r.json()["success"], r.text
                    update_s.append(time.perf_counter() - u0)
                    time.sleep(0.2)
            stop.set()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
            rows.append([phase, len(gaps), f"{len(gaps) / elapsed:.0f}",
                         f"{np.percentile(gaps, 50) * 1e3:.1f}",
                         f"{max(gaps) * 1e3:.1f}",
                         f"{statistics.median(update_s) * 1e3:.0f}" if update_s else "-"])
    finally:
        srv.stop()
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m clawjax.bench publish", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--updates", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="no-update phase length")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="clawjax-bench-publish-"))
    try:
        config = model_config(args.hidden, args.layers, args.vocab)
        print(f"export: qwen3 hidden={args.hidden} layers={args.layers} vocab={args.vocab} on "
              f"{jax.devices()[0].platform}, median of {args.repeats} (after 1 warm-up)")
        export = bench_export(config, args.repeats, root)
        print_table(["write", "MB", "ms", "MB/s"], export)
        print(f"\nweight-update stall: embedded server, tiny qwen3 (hidden 64, 2 layers), "
              f"{args.clients} streaming clients")
        stall = bench_update_stall(root, args.clients, args.updates, args.seconds)
        print_table(["phase", "waits", "tokens/s", "p50 wait ms", "max wait ms",
                     "update ms (median)"], stall)
        ratio = float(export[2][3].rstrip("x"))
        worst = float(stall[1][4]) / 1e3
        print(f"\nexport/raw ratio {ratio:.2f}x (target >= 0.7): "
              f"{'PASS' if ratio >= 0.7 else 'MISS'}; longest wait during updates "
              f"{worst:.3f} s (target < 1 s): {'PASS' if worst < 1.0 else 'MISS'}")
        if args.json:
            print(json.dumps({"export_ratio": ratio, "max_wait_s": worst,
                              "export": export, "stall": stall}))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0
