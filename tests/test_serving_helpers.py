"""Shared fixtures for the serving / publish tests: tiny HF Qwen3 checkpoints with the local
tokenizer, HF torch reference log-probs, and embedded servers on loopback. No tests here."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from aiohttp import web

import hf_tiny
from clawjax.serving.launch import free_port
from clawjax.tokenizer import build_tokenizer, save_tokenizer

REPO = Path(__file__).resolve().parents[1]


def make_model_dir(path: Path, seed: int, tokenizer: bool = True) -> Path:
    """A tiny Qwen3 (hidden 64, 2 layers) whose vocab is the local tokenizer's, saved with
    (optionally) the tokenizer files."""
    tok = build_tokenizer()
    model = hf_tiny.build("qwen3", seed=seed, vocab_size=len(tok),
                          eos_token_id=tok.eos_token_id, max_position_embeddings=512)
    hf_tiny.save(model, path)
    if tokenizer:
        save_tokenizer(tok, str(path))
    return path


def hf_model(path) -> torch.nn.Module:
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32).eval()


def hf_logp(model, ids: list[int]) -> np.ndarray:
    """float64 log-softmax `[N, V]` of HF `model` over `ids` (position t predicts t+1)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids], dtype=torch.long)).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def token_logps(model, ids: list[int], start: int) -> np.ndarray:
    """log π(ids[t] | ids[:t]) for t in start..N-1 under HF `model` (float64)."""
    lp = hf_logp(model, ids)
    return np.array([lp[t - 1, ids[t]] for t in range(start, len(ids))])


@pytest.fixture(scope="session")
def model_a(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model_a"), seed=0)


@pytest.fixture(scope="session")
def model_b(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model_b"), seed=1)


@pytest.fixture(scope="session")
def hf_a(model_a):
    return hf_model(model_a)


@pytest.fixture(scope="session")
def hf_b(model_b):
    return hf_model(model_b)


@pytest.fixture(scope="session")
def tokenizer(model_a):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_a))


@pytest.fixture(scope="module")
def server(model_a):
    """An embedded server of `model_a` on loopback (4 slots, 256-token context), per module."""
    from clawjax.serving.launch import ServerThread, make_context
    srv = ServerThread(make_context(str(model_a), max_batch=4, context_len=256)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def gen(http, **body) -> dict:
    """A `/generate` answer; fails the test on any status but 200."""
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_chat(http, body: dict) -> list[dict]:
    """The chunks of a streamed `/v1/chat/completions` answer to `body` (without `[DONE]`);
    fails the test on any status but 200."""
    chunks = []
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunks.append(json.loads(line[5:]))
    return chunks


def start_subprocess_server(model_dir, port: int, *extra: str, timeout: float = 120.0,
                            compile_cache: str | None = None):
    """`python -m clawjax.serve` in a subprocess; returns the Popen once it prints READY.
    `compile_cache`: a JAX persistent compilation cache directory shared by the servers (the
    first one compiles, the others load)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    if compile_cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(compile_cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clawjax.serve", "--model", str(model_dir), "--port", str(port),
         "--max-batch", "4", "--context-length", "256", *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if line.startswith("READY"):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc
    proc.kill()
    raise RuntimeError(f"server on port {port} did not start:\n{''.join(lines[-30:])}")


def wait_healthy(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not healthy after {timeout}s")


class Scripted:
    """A minimal SGLang-shaped server: /health (after `health_delay` seconds), /generate
    (after `delay` seconds, or `status`), /update_weights_from_disk and /get_model_info
    (records the version)."""

    def __init__(self, name: str, port: int | None = None, delay: float = 0.0):
        self.name, self.delay, self.status = name, delay, 200
        self.health_delay = 0.0
        self.update_delay = 0.0
        self.update_status = 200
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.generated = 0
        self.version = "default"
        self.updates: list[tuple[str, str]] = []
        self.runner: web.AppRunner | None = None

    async def start(self) -> "Scripted":
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_post("/generate", self._generate)
        app.router.add_post("/update_weights_from_disk", self._update)
        app.router.add_get("/get_model_info", self._info)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def _health(self, request):
        await asyncio.sleep(self.health_delay)
        return web.Response(text="")

    async def _generate(self, request):
        await asyncio.sleep(self.delay)
        self.generated += 1
        if self.status != 200:
            return web.json_response({"message": "scripted failure"}, status=self.status)
        return web.json_response({"text": self.name, "output_ids": [1],
                                  "meta_info": {"weight_version": self.version}})

    async def _update(self, request):
        await asyncio.sleep(self.update_delay)
        body = await request.json()
        if self.update_status != 200:
            return web.json_response({"success": False, "message": "cannot load"},
                                     status=self.update_status)
        self.updates.append((body["model_path"], body.get("weight_version")))
        self.version = body.get("weight_version")
        return web.json_response({"success": True, "message": "ok"})

    async def _info(self, request):
        return web.json_response({"weight_version": self.version})
