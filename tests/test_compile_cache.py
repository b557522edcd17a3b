"""`clawjax.compile_cache`: where `config.compile_cache_dir` points, and a real second process
loading what the first compiled (JAX's own cache-hit event counted, results compared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from clawjax import compile_cache
from clawjax.config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process: enable the cache, compile and run a function, report JAX's cache-hit events,
# the result and the cache directory of a child process it starts afterwards.
_PROCESS = r"""
import json, os, subprocess, sys
import jax, jax.numpy as jnp
from clawjax import compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
compile_cache.enable(sys.argv[1])
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) * 3.0)
out = f(jnp.arange(64.0).reshape(8, 8) / 64)
probe = "import jax; print(jax.config.jax_compilation_cache_dir)"
child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       check=True).stdout.strip()
print(json.dumps({"hits": len(hits), "out": [float(v) for v in out], "child": child}))
"""


def _run(cache: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop(compile_cache.ENV, None)
    done = subprocess.run([sys.executable, "-c", _PROCESS, cache], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    cache = str(tmp_path / "cache")
    first = _run(cache)
    assert first["hits"] == 0 and first["child"] == cache  # its children share the cache
    written = sorted(os.listdir(cache))
    assert written, "the first process left nothing in the cache"
    second = _run(cache)
    assert second["hits"] >= 1, second
    assert second["out"] == first["out"]  # the loaded executable computes the same thing
    assert sorted(os.listdir(cache)) == written  # a hit writes nothing new


def test_resolve_auto_off_and_explicit(tmp_path):
    c = base_config()
    c.workdir = str(tmp_path / "run")
    assert c.compile_cache_dir == compile_cache.AUTO
    assert compile_cache.resolve(c) == str(tmp_path / "run" / "xla_cache")
    c.compile_cache_dir = ""
    assert compile_cache.resolve(c) is None
    assert compile_cache.enable(None) is None
    c.compile_cache_dir = "~/shared-xla"
    assert compile_cache.resolve(c) == os.path.join(os.path.expanduser("~"), "shared-xla")
    c.compile_cache_dir = "gs://bucket/xla"  # a URL is JAX's to open, not a local path
    assert compile_cache.resolve(c) == "gs://bucket/xla"
