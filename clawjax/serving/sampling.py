"""Host-side token sampling and top-k log-prob extraction for the embedded server.

Inputs are one row of log-probabilities `logp [V]` (float32, the model's raw log-softmax at
temperature 1). Sampling works in float64: temperature, then top-k, min-p and top-p truncation,
then one draw from the renormalised distribution with the request's own `numpy` Generator, so a
seeded request is reproducible regardless of which other requests share its batch.
The log-probs a request reports are always the raw ones (not temperature-scaled or truncated):
they equal what the trainer recomputes with a plain forward pass.
"""

from __future__ import annotations

import numpy as np

from clawjax.serving.protocol import SamplingParams


def sample_token(logp: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from `logp [V]` under `params`. `temperature == 0` or `top_k == 1` is
    greedy (argmax, lowest id on ties)."""
    if params.temperature == 0.0 or params.top_k == 1:
        return int(np.argmax(logp))
    x = logp.astype(np.float64) / params.temperature
    if 0 < params.top_k < x.shape[0]:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x = np.where(x >= kth, x, -np.inf)
    x = x - np.max(x)
    probs = np.exp(x)
    probs /= probs.sum()
    if params.min_p > 0.0:
        probs = np.where(probs >= params.min_p * probs.max(), probs, 0.0)
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        # Keep the smallest prefix whose mass reaches top_p (the crossing token included).
        keep = int(np.searchsorted(cum, params.top_p * cum[-1])) + 1
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[:keep]] = True
        probs = np.where(mask, probs, 0.0)
    probs /= probs.sum()
    return int(rng.choice(probs.shape[0], p=probs))


def top_logprobs(logp: np.ndarray, k: int) -> list[tuple[float, int]]:
    """The `k` largest `(logprob, token_id)` pairs of `logp [V]`, largest first (ties: lower
    id first)."""
    if k <= 0:
        return []
    k = min(k, logp.shape[0])
    idx = np.argpartition(-logp, k - 1)[:k]
    idx = idx[np.lexsort((idx, -logp[idx]))]
    return [(float(logp[i]), int(i)) for i in idx]
