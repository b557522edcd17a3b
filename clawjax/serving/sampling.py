"""Host-side token sampling and (top-k) log-prob extraction for the embedded server.

Inputs are one row of log-probabilities `logp [V]` (float32, the model's raw log-softmax at
temperature 1). Sampling works in float64: banned ids (`min_new_tokens`' stop/EOS mask), then
temperature, then top-k, min-p and top-p truncation, then one draw from the renormalised
distribution with the request's own `numpy` Generator, so a seeded request is reproducible
regardless of which other requests share its batch. A temperature below `SAMPLING_EPS` is greedy
(SGLang's `_SAMPLING_EPS`), so no temperature can overflow the scaled row to NaN.
The log-probs a request reports are always the raw ones (not masked, temperature-scaled or
truncated): they equal what the trainer recomputes with a plain forward pass. The mask and the
truncations only decide which token is drawn.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from clawjax.serving.protocol import SamplingParams

SAMPLING_EPS = 1e-6  # temperatures below it are greedy (SGLang: top_k = 1)


def sample_token(logp: np.ndarray, params: SamplingParams, rng: np.random.Generator,
                 banned: Iterable[int] = ()) -> int:
    """One token id from `logp [V]` under `params`, never one of `banned` unless that would
    leave no finite log-prob (then the raw row is used). `temperature < SAMPLING_EPS` or
    `top_k == 1` is greedy (argmax, lowest id on ties). `logp` itself is not modified."""
    banned = [i for i in banned if 0 <= i < logp.shape[0]]
    if banned:
        masked = logp.copy()
        masked[banned] = -np.inf
        if np.isfinite(masked).any():
            logp = masked
    if params.temperature < SAMPLING_EPS or params.top_k == 1:
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


def prompt_logprobs(tok_logp: np.ndarray, top_v: np.ndarray | None, top_i: np.ndarray | None,
                    j: int, n: int, start: int, k: int) -> tuple[list, list]:
    """SGLang's input log-probs of row `j` of a prefill, an `n`-token prompt: `tok_logp [b, T]`
    (position t scores prompt token t + 1), `top_v / top_i [b, T, >=k]` (unused when k = 0).
    Returns `(input_logp, input_top)` for positions `start .. n-1` (`start = -1`: `n - 1`),
    the first entry of each `None`; `input_top` is `[]` when `k = 0`."""
    s = n - 1 if start < 0 else start
    logp = [None] + [float(tok_logp[j, p - 1]) for p in range(s + 1, n)]
    if not k:
        return logp, []
    return logp, [None] + [[(float(v), int(i)) for v, i in zip(top_v[j, p - 1, :k],
                                                               top_i[j, p - 1, :k])]
                           for p in range(s + 1, n)]
