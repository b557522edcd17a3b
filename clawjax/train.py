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
"""

from __future__ import annotations

import os
import sys

from absl import app
from ml_collections import config_flags

from clawjax import compile_cache

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


def main(argv) -> int:
    del argv
    quiet_logging()
    config = _CONFIG.value
    compile_cache.enable(compile_cache.resolve(config))  # before the first compilation
    __import__("clawjax.distributed").distributed.maybe_initialize(config)  # before any JAX op
    if config.rollout.local:  # the whole loop on this machine (configs/default.py)
        from clawjax.default_run import run_default

        run_default(config)
        return 0
    from clawjax.loop import TrainLoop  # heavy imports after flag parsing

    loop = TrainLoop(config)
    loop.install_signal_handlers()
    try:
        loop.run()
    finally:
        loop.close()
    return 0


def run() -> None:
    app.run(main, argv=with_default_config(sys.argv))


if __name__ == "__main__":
    run()
