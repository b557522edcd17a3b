"""Building and running the embedded server: model directory → engine + tokenizer → aiohttp.

`make_context(model_dir, ...)` loads the model (float32 by default, so served log-probs equal
the trainer's float32 recomputation), the tokenizer and chat template when the directory has
tokenizer files, and the stop tokens (tokenizer eos, `<|im_end|>`, config/generation_config
`eos_token_id`). `ServerThread` runs the app on a loopback port in a background thread (tests,
benchmarks); `python -m clawjax.serve` runs the same app in the foreground.
"""

from __future__ import annotations

import json
import logging
import os
import socket

import jax.numpy as jnp
from aiohttp import web

from clawjax.loop_thread import LoopThread
from clawjax.serving.engine import Engine
from clawjax.serving.server import ServerContext, build_app

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_dir: str):
    """The directory's tokenizer, or None when it holds no tokenizer files. A `tokenizer.json`
    loads as `PreTrainedTokenizerFast` directly (no torch import: a faster start); other
    layouts go through `AutoTokenizer`."""
    if not any(os.path.exists(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        return None
    if os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(model_dir)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def _eos_from_json(path: str) -> set[int]:
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        value = json.load(f).get("eos_token_id")
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, list) else [value])}


def stop_token_ids(model_dir: str, tokenizer) -> set[int]:
    ids = _eos_from_json(os.path.join(model_dir, "config.json"))
    ids |= _eos_from_json(os.path.join(model_dir, "generation_config.json"))
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
            ids.add(im_end)
    return ids


def make_context(model_dir: str, *, max_batch: int = 8, context_len: int | None = None,
                 api_key: str | None = None, weight_version: str = "default",
                 dtype=jnp.float32, seed: int = 0) -> ServerContext:
    """Loads `model_dir` and builds the engine and the handlers' context. `context_len`
    defaults to min(max_position_embeddings, 1024)."""
    from clawjax import model as cm

    def load_model(path: str):
        return cm.from_pretrained(path, dtype=dtype)

    model, config = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    if context_len is None:
        context_len = min(int(getattr(config, "max_position_embeddings", 1024) or 1024), 1024)
    detok = None if tokenizer is None else (
        lambda ids, skip_special: tokenizer.decode(ids, skip_special_tokens=skip_special))
    engine = Engine(model, config, max_batch=max_batch, context_len=context_len,
                    weight_version=weight_version, eos_ids=tuple(stop_token_ids(model_dir,
                                                                               tokenizer)),
                    detokenize=detok, seed=seed)
    with open(os.path.join(model_dir, "config.json")) as f:
        architectures = json.load(f).get("architectures") or []
    return ServerContext(engine, tokenizer, model_path=model_dir, load_model=load_model,
                         api_key=api_key, architectures=architectures)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """Runs the embedded server in a daemon thread: `url` once started, `stop()` to end.

    Usage: `srv = ServerThread(make_context(dir)).start(); ...; srv.stop()`.
    """

    def __init__(self, ctx: ServerContext, host: str = "127.0.0.1", port: int = 0):
        self.ctx = ctx
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self._worker = LoopThread("clawjax-http")
        self._runner: web.AppRunner | None = None

    async def _serve(self) -> web.AppRunner:
        runner = web.AppRunner(build_app(self.ctx), access_log=None, handler_cancellation=True)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        return runner

    def start(self, timeout: float = 60.0) -> "ServerThread":
        try:
            self._runner = self._worker.launch(self._serve(), timeout)
        except BaseException as e:
            raise RuntimeError(f"server on {self.url} failed to start: {e!r}") from e
        return self

    def stop(self) -> None:
        if self._runner is not None and self._worker.running:
            self._worker.run(self._runner.cleanup(), timeout=30)
        self._runner = None
        self._worker.stop()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
