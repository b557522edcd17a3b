"""GRPO group normalisation of sample rewards (SPEC §2), on the host, before packing.

The reference trains one sample per prompt (n = 1), so `loss.group_norm = "none"` is the
default; with several responses per prompt the option turns each sample's reward into its
group-relative advantage, `losses.grpo_advantages` (one formula for the library and the
trainer):

  "mean"      r_i − mean_g(r)
  "mean_std"  (r_i − mean_g(r)) / (std_g(r) + 1e-6)   (unbiased std; a group of one gives 0)

Groups: samples with the same `metadata["group_id"]` when a sample carries one, else the same
prompt tokens (the n responses to one prompt). Only the samples of one training step (on one
process) are grouped: samples stream in, so a group split across steps is normalised over the
members present. Samples without an RL signal (`kind = "opd"`, reward 0 by contract) keep their
reward and join no group.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

GROUP_NORM_MODES = ("none", "mean", "mean_std")
GROUP_ID_KEY = "group_id"


def group_key(sample) -> str:
    """The group a sample belongs to: its `metadata["group_id"]`, else a digest of its prompt
    tokens (`tokens[:prompt_len]`)."""
    given = sample.metadata.get(GROUP_ID_KEY)
    if given:
        return f"id:{given}"
    prompt = np.ascontiguousarray(sample.tokens[:sample.prompt_len], dtype="<i4")
    return "prompt:" + hashlib.blake2b(prompt.tobytes(), digest_size=16).hexdigest()


def normalize_rewards(samples: list, mode: str, eps: float = 1e-6) -> list:
    """`samples` with each RL-carrying sample's reward replaced by its group-normalised value
    (new `Sample` objects; the inputs are not changed). `mode` is one of GROUP_NORM_MODES;
    "none" returns `samples` itself."""
    if mode not in GROUP_NORM_MODES:
        raise ValueError(f"group_norm = {mode!r}, expected one of {GROUP_NORM_MODES}")
    rl = [i for i, s in enumerate(samples) if s.kind != "opd"]
    if mode == "none" or not rl:
        return samples
    import jax

    from clawjax import losses

    keys: dict[str, int] = {}
    ids = np.asarray([keys.setdefault(group_key(samples[i]), len(keys)) for i in rl], np.int32)
    rewards = np.asarray([samples[i].reward for i in rl], np.float32)
    normalized = np.asarray(jax.device_get(losses.grpo_advantages(
        rewards, ids, scale_by_std=mode == "mean_std", eps=eps)))
    out = list(samples)
    for i, value in zip(rl, normalized):
        out[i] = dataclasses.replace(samples[i], reward=float(value))
    return out
