"""The persistent XLA compilation cache: compiled executables kept on disk, so that a second run
in the same workdir, or a process restarted after a crash, loads its train step, its server's
prefill and decode buckets and its evaluator instead of compiling them again.

`config.compile_cache_dir`: "auto" (the default) is `<workdir>/xla_cache`, which a new local
run leaves in place when it moves an earlier run's files aside (like `warmstart/`); "" turns the
cache off; anything else is the directory (several runs or hosts may share one; a URL such as
`gs://bucket/xla_cache` is passed to JAX as it is). JAX keeps only compilations that took at
least `jax_persistent_cache_min_compile_time_secs` (1 s by default).

The directory only grows (one file per distinct compiled program): delete it to start afresh.
An entry that cannot be loaded (e.g. its writer was killed mid-write: entries are compressed,
so a truncated one fails to decompress) costs a warning and a compile.

`enable` must run before the process's first compilation. It also exports
`JAX_COMPILATION_CACHE_DIR`, so that the processes the run starts afterwards (the local stack's
server and evaluator) share the cache without being told.
"""

from __future__ import annotations

import os

ENV = "JAX_COMPILATION_CACHE_DIR"
AUTO = "auto"
SUBDIR = "xla_cache"


def resolve(config) -> str | None:
    """The absolute cache directory `config.compile_cache_dir` names, or None when it is off."""
    value = config.get("compile_cache_dir", AUTO)
    if not value:
        return None
    path = os.path.join(config.workdir, SUBDIR) if value == AUTO else value
    if "://" in path:  # e.g. gs://bucket/xla_cache, which JAX reads and writes itself
        return path
    return os.path.abspath(os.path.expanduser(path))


def enable(path: str | None, environ=os.environ) -> str | None:
    """Points this process's JAX (and, through `environ`, its future child processes) at the
    cache in `path`, creating it; does nothing for None. Returns `path`."""
    if path is None:
        return None
    import jax

    if "://" not in path:
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    environ[ENV] = path
    return path
