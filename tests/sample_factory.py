"""Synthetic `Sample`s for trainer and buffer tests (deterministic from a seed)."""

from __future__ import annotations

import numpy as np

from clawjax.sample import Sample


def make_samples(n: int, vocab_size: int = 512, seed: int = 0, min_len: int = 8,
                 max_len: int = 48, opd_every: int = 3, prefix: str = "s") -> list[Sample]:
    """`n` valid samples: random prompts/responses, rewards ±1, every `opd_every`-th an OPD
    sample (kind "both") with teacher log-probs; rollout log-probs ≤ 0."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        response_len = int(rng.integers(1, length // 2 + 1))
        tokens = rng.integers(1, vocab_size, size=length).astype(np.int32)
        rollout = -rng.uniform(0.5, 6.0, size=response_len).astype(np.float32)
        opd = opd_every > 0 and i % opd_every == 0
        teacher = -rng.uniform(0.1, 6.0, size=response_len).astype(np.float32) if opd else None
        out.append(Sample(
            sample_id=f"{prefix}{seed}-{i}", tokens=tokens, response_len=response_len,
            rollout_logp=rollout, reward=float(rng.choice([-1.0, 1.0])),
            kind="both" if opd else "rl", teacher_logp=teacher, session_id=f"sess{i % 5}",
            turn_index=i, policy_version=0, created_unix_ms=1_700_000_000_000 + i,
        ))
    return out
