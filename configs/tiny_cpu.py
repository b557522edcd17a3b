"""A tiny random Qwen3 (vocabulary 512) that trains in seconds on a CPU.

    python -m clawjax.train --config=configs/tiny_cpu.py --config.replay=samples.jsonl \
        --config.workdir=/tmp/tiny --config.trainer.steps=20
"""

from clawjax.config import base_config


def get_config():
    c = base_config()
    c.workdir = "workdir/tiny_cpu"
    c.model.dtype = "float32"
    c.trainer.lr = 1e-3
    c.trainer.samples_per_step = 8
    c.trainer.token_budget = 256
    c.trainer.steps = 20
    c.checkpoint.every_steps = 10
    return c
