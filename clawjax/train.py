"""`python -m clawjax.train`: the trainer's main job, wired from one config.

    python -m clawjax.train                                   # configs/default.py
    python -m clawjax.train --config=configs/tiny_cpu.py --config.replay=samples.jsonl \
        --config.workdir=/tmp/run --config.trainer.steps=20

Each step: take `samples_per_step` samples → validate (rejections are counted and kept, never
silent) → pack into `TokenBatch` rows → one jitted, sharded update → metrics. Every
`checkpoint.every_steps` (and at the end, and on SIGTERM / Ctrl-C) the train state is saved with
orbax; samples whose update a checkpoint holds are acknowledged to their source only once that
checkpoint is committed, so after a crash nothing is trained twice or lost. Compiled
executables are kept in `<workdir>/xla_cache` (`config.compile_cache_dir`), so a second run or a
restarted process loads what an earlier one compiled.

The config is checked before anything is written or started (`check_start`): an unknown key, a
value of the wrong type, a config file that cannot be loaded (`parse_flags`), a bad value, no
sample source or a workdir holding an earlier run's checkpoints exits 2 with one `error:` line
naming the key (or flag) and the value. `python -m clawjax.sequential_run` goes through the same
path (`run`, `run_checked`).
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

from clawjax import compile_cache
from clawjax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", default=None, help_string="a config file, configs/NAME.py (default: configs/default.py)",
    lock_config=True)


def default_config_path() -> str:
    """The packaged `configs/default.py` (installed as `clawjax.configs.default`)."""
    import clawjax.configs

    return os.path.join(os.path.dirname(clawjax.configs.__file__), "default.py")


def with_default_config(argv: list[str]) -> list[str]:
    """Adds `--config=<default>` when the command line names no config file."""
    if any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
        return argv
    return [argv[0], f"--config={default_config_path()}", *argv[1:]]


def quiet_logging() -> None:
    """clawjax's own messages at INFO; libraries (orbax, httpx, absl) only warnings."""
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("httpx", "httpcore", "orbax", "jax", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("clawjax").setLevel(logging.INFO)


def require_sample_source(config) -> None:
    """Raises `ConfigError` when the command line would train from nothing: no `replay` file, no
    `buffer.address` and not the local default run (`rollout.local`). Nothing would ever feed
    the in-process queue `TrainLoop` falls back to (a library user passes its own `source=`)."""
    if config.replay or config.buffer.address or config.rollout.local:
        return
    raise config_lib.ConfigError(
        "replay", config.replay,
        "a JSONL file of samples (--config.replay=FILE), or buffer.address = 'host:port' of a "
        "rollout buffer (--config.buffer.address=HOST:PORT): python -m clawjax.train has no "
        "other sample source (rollout.local=True runs the local default stack)")


def require_paths(config) -> None:
    """Raises `ConfigError` naming the key for a path the run would fail on later, with a
    traceback and after side effects: `replay` and (with the gate) `gate.probe` not files, or
    no `gate.probe` at all outside the local run (which makes its own), `model.path` without a
    config.json, `publish.dir` not a directory, `trainer.resume` with no checkpoint to resume
    (the local run too: it resumes in its workdir as it is)."""
    def refuse_unless(ok: bool, key: str, value, expected: str) -> None:
        if not ok:
            raise config_lib.ConfigError(key, value, expected)

    if config.replay:
        refuse_unless(os.path.isfile(config.replay), "replay", config.replay,
                      "an existing JSONL file of samples")
    if config.gate.enabled and config.gate.probe:
        refuse_unless(os.path.isfile(config.gate.probe), "gate.probe", config.gate.probe,
                      "an existing JSONL file of probe samples")
    if config.gate.enabled and not config.rollout.local:  # as loop_gate.make_gate, earlier
        refuse_unless(bool(config.gate.probe), "gate.probe", config.gate.probe,
                      "a JSONL file of probe samples when gate.enabled (only the local run, "
                      "rollout.local, sets its own probe aside)")
    if config.model.path:
        refuse_unless(os.path.isfile(os.path.join(config.model.path, "config.json")),
                      "model.path", config.model.path,
                      "a Hugging Face model directory (holding config.json)")
    publish_dir = str(config.publish.dir or "")
    if publish_dir and int(config.publish.every_steps) > 0:
        refuse_unless(not os.path.exists(publish_dir) or os.path.isdir(publish_dir),
                      "publish.dir", publish_dir, "a directory (or a path to create one at)")
    if config.trainer.resume:
        from clawjax import workdir as workdir_lib

        workdir = os.path.abspath(config.workdir)
        refuse_unless(bool(workdir_lib.checkpoint_steps(workdir)), "trainer.resume", True,
                      f"False for a new run: no checkpoint exists under {workdir} to resume")


def check_start(config) -> None:
    """The start-up checks, run before any side effect (the compilation cache directory,
    jax.distributed, the default run moving an earlier run aside and warm-starting): on the
    local run, no user value for a key it supplies (first: it would make a misleading error of
    the checks after it); every config value, a sample source, the paths (`require_paths`), and
    a workdir without an earlier run's files (`require_fresh`). The local default run checks
    what it will use (`require_fresh_local`): resuming, its workdir as it is (a checkpoint
    there: `require_paths`); a new run moves the earlier run's files aside first, so only a
    `publish.dir` the move leaves in place must hold no versions. Raises `ConfigError` naming
    the key."""
    from clawjax import workdir as workdir_lib

    if config.rollout.local:
        from clawjax.default_run import check_local_keys

        check_local_keys(config)
    config_lib.validate(config)
    require_sample_source(config)
    require_paths(config)
    workdir = os.path.abspath(config.workdir)
    publish_dir = workdir_lib.own_publish_dir(config)
    if config.rollout.local:
        workdir_lib.require_fresh_local(workdir, config.trainer.resume, publish_dir=publish_dir)
    else:
        workdir_lib.require_fresh(workdir, config.trainer.resume, publish_dir=publish_dir)


def run_checked(config, train_fn: Callable, first: Callable | None = None) -> int:
    """`first(config)` (an entry point's own check, if any), `check_start(config)`, then
    `train_fn(config)`: exit status 2 with one `error:` line for a `ConfigError`, at start-up
    or found later (a replay file that cannot fill a step); 0 when the run ends. The entry
    points' one path (this module's `main`, `clawjax.sequential_run`)."""
    try:
        if first is not None:
            first(config)
        check_start(config)
        train_fn(config)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv) -> int:
    """`train` the config after `check_start` (`run_checked`: exit status 2 with one `error:`
    line for a `ConfigError`)."""
    del argv
    quiet_logging()
    return run_checked(_CONFIG.value, train)


def train(config) -> None:
    """The run `config` describes, after `check_start`."""
    compile_cache.enable(compile_cache.resolve(config))  # before the first compilation
    __import__("clawjax.distributed").distributed.maybe_initialize(config)  # before any JAX op
    if config.rollout.local:  # the whole loop on this machine (configs/default.py)
        from clawjax.default_run import run_default

        run_default(config)
        return
    from clawjax.loop import TrainLoop  # heavy imports after flag parsing

    loop = TrainLoop(config)
    loop.install_signal_handlers()
    try:
        loop.run()
    finally:
        loop.close()


def flag_arg(argv: list[str], flag: str) -> str | None:
    """The value of the last `--FLAG=VALUE` (or `--FLAG VALUE`) on the command line (absl:
    the last one wins)."""
    found = None
    for i, arg in enumerate(argv[1:], 1):
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == flag:
            found = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return found


def config_file_arg(argv: list[str]) -> str | None:
    """The value of `--config=FILE` (or `--config FILE`) on the command line."""
    return flag_arg(argv, _CONFIG.name)


def override_keys(argv: list[str]) -> list[str]:
    """The keys the command line sets: `publish.dir` for `--config.publish.dir=D`."""
    prefix = _CONFIG.name + "."
    names = (arg.lstrip("-").partition("=")[0] for arg in argv[1:] if arg.startswith("-"))
    return [n.removeprefix(prefix) for n in names if n.startswith(prefix)]


def unknown_key_message(config, key: str) -> str | None:
    """`unknown config key K (S has: ...)` for the first part of `key` that `config` lacks, S
    being the section it was looked up in; None when `key` exists."""
    node, walked = config, []
    for part in key.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else None
        section = ".".join(walked) or "the config"
        if keys is None:
            return f"unknown config key {key} ({section} is a value, not a section)"
        if part not in keys:
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f"; did you mean {'.'.join([*walked, close[0]])}?" if close else ""
            return (f"unknown config key {'.'.join([*walked, part])} ({section} has: "
                    f"{', '.join(keys)}){hint}")
        node, walked = node[part], [*walked, part]
    return None


# What a `--config.KEY=VALUE` of each type must look like (`flag_error_message`).
_EXPECTED_TYPE = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}


def config_key_type(key: str) -> type | None:
    """The type the parsed config holds at `key` (placeholders too); None if unknown."""
    *sections, name = key.split(".")
    try:
        node = flags.FLAGS[_CONFIG.name].value
        for part in sections:
            node = node[part]
        return node.get_type(name)
    except (AttributeError, KeyError, OSError, TypeError):
        return None


def flag_error_message(argv: list[str], error: Exception) -> str:
    """One line for absl's `flags.Error`: for a `--config.KEY` value of the wrong type, the
    `ConfigError` line naming the key, the value and the type expected; otherwise absl's own
    message (an unknown flag, a flag without its value) on one line."""
    detail = " ".join(str(error).split())
    prefix = _CONFIG.name + "."
    for key in override_keys(argv):
        name = prefix + key
        value = flag_arg(argv, name)
        if value is None or not detail.startswith(f"flag --{name}={value}: "):
            continue
        reason = detail[len(f"flag --{name}={value}: "):]
        expected = _EXPECTED_TYPE.get(config_key_type(key), "a value of the key's type")
        return str(config_lib.ConfigError(key, value, f"{expected} ({reason})"))
    return detail


def config_load_error(argv: list[str], config=None) -> str | None:
    """One line naming `--config` and its value when the config file could not be loaded
    (ml_collections defers that error to the config's first use: a traceback in `main`, or
    in the parsing of a `--config.KEY` override); None when it loaded. `config`: the parsed
    flag's value, else the file is loaded again."""
    if config is None:
        path = config_file_arg(argv)
        if path is None:
            return None
        config = flags.FLAGS[_CONFIG.name].parser.parse(path)
    try:
        config.keys()
    except OSError as e:
        cause = e.__cause__ or e
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        return (f"--{_CONFIG.name} = {config_file_arg(argv)!r}, expected a config file that "
                f"can be loaded, such as configs/default.py ({lines[-1] if lines else cause})")
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; a bad flag exits 2 with one `error:` line naming it and its value:
    an unknown `--config.KEY` (not ml_collections' chained AttributeError traceback), a
    `--config.KEY` value of the wrong type, any other flag absl refuses (not absl's `FATAL
    Flags parsing error`, exit 1), a `--config` file that cannot be loaded (not an OSError
    traceback)."""
    def refuse(message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        refuse(flag_error_message(argv, e))
    except OSError:  # a --config.KEY override of a config file that failed to load
        message = config_load_error(argv)
        if message is None:
            raise
        refuse(message)
    except (AttributeError, KeyError):
        path = config_file_arg(argv)
        if path is None:
            raise
        config = flags.FLAGS[_CONFIG.name].parser.parse(path)
        for key in override_keys(argv):
            message = unknown_key_message(config, key)
            if message is not None:
                refuse(message)
        raise
    message = config_load_error(argv, flags.FLAGS[_CONFIG.name].value)
    if message is not None:
        refuse(message)
    return rest


def run(main_fn: Callable[[list[str]], int] = main) -> None:
    """`main_fn` (this module's `main`, or another entry point's) after `parse_flags`, with
    configs/default.py when the command line names no config file."""
    app.run(main_fn, argv=with_default_config(sys.argv), flags_parser=parse_flags)


if __name__ == "__main__":
    run()
