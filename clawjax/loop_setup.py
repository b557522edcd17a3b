"""What a `TrainLoop` is built from, by the config: the model, the sample source, the publisher.

`build_model` loads `model.path` (an HF directory) or initialises `model.hf_config` at random,
sharded over `mesh`; `make_source` picks the replay file, the gRPC buffer or an in-process queue;
`make_publisher` the checkpoint publisher (None when `publish.every_steps` is 0).
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from clawjax import config as config_lib
from clawjax import model as model_lib
from clawjax import sources

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config, mesh):
    """`(model, model_config)` from `model.path` (HF directory) or `model.hf_config` (random)."""
    dtype = DTYPES[config.model.dtype]
    if config.model.path:
        model, model_config = model_lib.from_pretrained(config.model.path, dtype=dtype, mesh=mesh,
                                                        remat=config.model.remat)
    else:
        model_config = model_lib.ModelConfig.from_hf(dict(config.model.hf_config))
        model_config = model_config.replace(remat=bool(config.model.remat))
        model = model_lib.init_random(model_config, config.model.seed, dtype=dtype, mesh=mesh)
    # A training option, not part of the weights: set on the built model (static in its graphdef).
    model.config = model_config = model_config.replace(attention=config.model.attention)
    return model, model_config


def make_source(config, vocab_size: int, workdir: str):
    if config.replay:
        source = sources.ReplaySource(config.replay, vocab_size=vocab_size)
        if len(source.samples) < config.trainer.samples_per_step:
            raise config_lib.ConfigError(
                "replay", config.replay,
                f"a file of at least trainer.samples_per_step = "
                f"{config.trainer.samples_per_step} samples (one step would train a sample "
                f"twice); it holds {len(source.samples)}")
        return source
    if config.buffer.address:
        token = config_lib.read_secret_file("buffer.token_file", config.buffer.token_file,
                                            "the buffer's token")
        return sources.BufferSource(
            config.buffer.address, token=token, tls_ca=config.buffer.tls_ca or None,
            rejected_path=os.path.join(workdir, "rejected.jsonl"),
            keepalive_s=config.buffer.keepalive_s,
            # a buffer outage is a wait for samples: given up on (and retried) as often as a
            # wait for samples, so a stop is seen in time
            retry_budget_s=max(float(config.trainer.take_timeout_s), 1.0))
    return sources.QueueSource()


def make_publisher(config, workdir: str):
    """The config's publisher (None when `publish.every_steps` is 0)."""
    from clawjax.publish import publisher_from_config

    tokenizer_dir = config.model.path or None
    return publisher_from_config(config.publish, workdir, tokenizer_dir=tokenizer_dir)
