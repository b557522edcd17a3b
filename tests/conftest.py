"""Test session setup: 8 fake CPU devices for sharding tests (set before jax is imported), and
one persistent XLA compilation cache for the tests of this session.

Many tests build the same tiny model and train step afresh (a new `jax.jit` each time, so JAX's
in-memory cache misses): with the session's on-disk cache each distinct program compiles once
(the gate tests alone run about 1.8x faster), also across pytest-xdist's workers, which share it
(less CPU than one cache per worker: 5% on the gate and trainer files). It starts empty in
a temporary directory, so no test depends on a previous session; processes a test starts do not
inherit it (they keep their own cache settings, which some tests check)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402  (after the environment above)

# Made by the first process of the session (pytest itself, or pytest-xdist's controller, which
# imports this file before it starts its workers) and inherited by the rest through the
# environment: the workers share one cache, so a program two test files compile is compiled
# once. Unbounded, as JAX's default: a size bound would make JAX lock the directory and scan
# every entry on each write (quadratic over a session's thousands of programs; with it the
# suite's system CPU rose from 106 to 155 s). A worker reading an entry the other is writing reads it
# truncated, which fails to decompress: JAX warns and compiles (the cost of no sharing).
_CACHE_ENV = "CLAWJAX_TESTS_XLA_CACHE"
if _CACHE_ENV not in os.environ:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="clawjax-tests-xla-")
    atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], ignore_errors=True)
_SESSION_XLA_CACHE = os.environ[_CACHE_ENV]
jax.config.update("jax_compilation_cache_dir", _SESSION_XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # every program


# The slowest test files (seconds on 2 cores, 2026-11-29; gate and trainer timed after their
# split, alone, with other work on the machine), collected first, and xdist told to
# hand files out in collection order. By default `--dist loadfile` hands out the files with the
# most tests first, so a slow file of few tests (test_default_run: 3 tests, 172 s) started near
# the end and kept one worker busy while the other sat idle. Longest first keeps the tail
# short. Order within a file is unchanged.
_SLOW_FILES_FIRST = (
    "test_bench_loops.py",      # 275 s: the whole-loop bench smoke runs
    "test_default_run.py",      # 172 s
    "test_trainer.py",          # 119 s (its sample-intake tests: test_trainer_samples, 28 s)
    "test_gate.py",             # 101 s
    "test_gate_resume.py",      # 98 s
    "test_multihost_gate.py",   # 97 s
    "test_multihost.py",        # 63 s
    "test_train_cli.py",        # 48 s
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):   # pytest-xdist: keep the order above
        config.option.loadscopereorder = False
