"""Shared fixtures for the serving / publish tests: tiny HF Qwen3 checkpoints with the local
tokenizer, HF torch reference log-probs, and embedded servers on loopback. No tests here."""

from __future__ import annotations

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

import hf_tiny
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


def start_subprocess_server(model_dir, port: int, *extra: str, timeout: float = 120.0):
    """`python -m clawjax.serve` in a subprocess; returns the Popen once it prints READY."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
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
