"""Qwen3-0.6B from an HF checkpoint directory (`--config.model.path=DIR`), bfloat16, FSDP.

    python -m clawjax.train --config=configs/qwen3_0_6b.py --config.model.path=/ckpt/Qwen3-0.6B \
        --config.buffer.address=HOST:PORT
"""

from clawjax.config import base_config


def get_config():
    c = base_config()
    c.workdir = "workdir/qwen3_0_6b"
    c.model.path = ""  # required: an HF Qwen3-0.6B directory
    c.model.hf_config = {}
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.trainer.lr = 1e-5
    c.trainer.samples_per_step = 16
    c.trainer.token_budget = 8192
    c.trainer.micro_batches = 2
    c.checkpoint.every_steps = 20
    c.publish.every_steps = 1
    return c
