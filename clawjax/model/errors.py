"""Exceptions raised by `clawjax.model` and `clawjax.sharding` for bad input.

Every message names the offending thing (file, field, tensor, dimension), the value found and
what was expected, so a bad checkpoint or mesh can be fixed without reading code.
"""


class ModelError(ValueError):
    """Base class of all model / checkpoint / sharding input errors."""


class ConfigError(ModelError):
    """A config.json field has a value the model does not support (e.g. `hidden_act='gelu'`)."""


class UnsupportedModelError(ConfigError):
    """`model_type` is not one of `SUPPORTED_MODEL_TYPES`."""


class CheckpointError(ModelError):
    """Safetensors weights do not match the config: missing, unexpected or wrong-shaped tensors."""


class ShardingError(ModelError):
    """A mesh does not divide the device count, or a parameter dimension its mesh axis."""
