"""The reference run (SPEC.md §6): Qwen3-4B, combined Binary RL + hindsight OPD.

Adam(W) lr 1e-5 constant, β = (0.9, 0.98), weight decay 0.1, gradient clip 1.0, 16 samples per
step, responses ≤ 8192 tokens, contexts ≤ 32768 tokens, rollout log-probs as old log-probs.

    python -m clawjax.train --config=configs/qwen3_4b_combine.py \
        --config.model.path=/ckpt/Qwen3-4B --config.buffer.address=HOST:PORT \
        --config.publish.urls=http://fleet-0:30000,http://fleet-1:30000
"""

from clawjax.config import base_config


def get_config():
    c = base_config()
    c.workdir = "workdir/qwen3_4b_combine"
    c.method = "combine"
    c.model.path = ""  # required: an HF Qwen3-4B directory
    c.model.hf_config = {}
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.loss.old_logp = "rollout"  # use_rollout_logprobs
    c.trainer.lr = 1e-5
    c.trainer.b1 = 0.9
    c.trainer.b2 = 0.98
    c.trainer.weight_decay = 0.1
    c.trainer.grad_clip = 1.0
    c.trainer.samples_per_step = 16
    c.trainer.token_budget = 32768  # max context: one row holds the longest sample
    c.trainer.max_response_len = 8192  # longer responses are dropped (`too_long`)
    c.rollout.max_tokens = 8192  # what the local agents ask the fleet for
    c.trainer.micro_batches = 4
    c.checkpoint.every_steps = 10
    c.publish.every_steps = 1
    return c
