"""clawjax: the training core of OpenClaw-RL in JAX.

Kept import-light on purpose: `from clawjax import losses` must work with only jax and numpy
installed, so nothing here imports flax, grpc, torch or transformers.
"""

__version__ = "0.1.0"
