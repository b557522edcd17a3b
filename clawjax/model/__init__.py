"""clawjax.model: the Flax NNX policy (Qwen3 / Qwen2 / Llama 3) that equals the HF checkpoint.

    model, config = from_pretrained(path, dtype=jnp.bfloat16, mesh=None)
    logits = model(tokens, positions=None, segment_ids=None)   # [B,T,V] float32
    h, w = model.hidden(tokens, positions, segment_ids), model.lm_head()   # [B,T,D], [D,V]
    save_pretrained(model, config, path, dtype=jnp.bfloat16)
    write_hf_checkpoint(config, path, fetch, dtype)   # fetch(TensorMap) -> one HF-layout tensor
    model = init_random(config, seed, dtype=jnp.float32, mesh=None)
    cache = model.init_cache(batch_size, max_len); logits, cache = model.forward_cached(t, p, cache)
"""

from clawjax.model.cache import KVCache
from clawjax.model.config import SUPPORTED_MODEL_TYPES, ModelConfig
from clawjax.model.errors import (CheckpointError, ConfigError, ModelError, ShardingError,
                                  UnsupportedModelError)
from clawjax.model.params import (from_pretrained, hf_table, load_config, save_pretrained,
                                  write_hf_checkpoint)
from clawjax.model.transformer import Transformer, abstract_model, init_random

__all__ = [
    "KVCache", "ModelConfig", "SUPPORTED_MODEL_TYPES", "Transformer", "from_pretrained",
    "save_pretrained", "write_hf_checkpoint", "init_random", "abstract_model", "load_config",
    "hf_table", "ModelError", "ConfigError",
    "UnsupportedModelError", "CheckpointError", "ShardingError",
]
