"""Shared turns and judgements of the rollout tests: `turn()` (one served main turn, R = 3
response tokens), `msgs(...)`, `verdict(reward, hint)` (a `Judgement`), and the teacher log-probs
`TEACHER [3]` and hint `HINT` that go with them."""

from __future__ import annotations

import numpy as np

from clawjax.rollout.judge import Judgement
from clawjax.rollout.sessions import Turn


def turn(sid="s", index=0, r=3, version="7") -> Turn:
    return Turn(session_id=sid, turn_index=index, messages=[{"role": "user", "content": "q"}],
                prompt_ids=[1, 2, 3, 4], response_ids=list(range(10, 10 + r)),
                rollout_logp=[-0.5] * r, weight_version=version, response_text="a",
                created_unix_ms=5)


def msgs(*roles_texts):
    return [{"role": r, "content": t} for r, t in roles_texts]


def verdict(reward, hint=None, votes=None):
    return Judgement(votes=votes or [reward], reward=reward, hint_votes=[1 if hint else -1],
                     hint=hint, answers=["\\boxed{%d}" % reward], hint_answers=[""])


TEACHER = np.array([-0.1, -0.2, -0.3], np.float32)
HINT = "Always give the unit."
