"""The three training methods (SPEC §2–§3, §7) and what each presets: the loss weights and KL
coefficient the trainer fills in (`clawjax.config.resolved_loss_kwargs`) and the judge votes per
turn the rollout side asks for (`prm_m_for`). No dependencies: the trainer's config and the
rollout proxy both read it."""

from __future__ import annotations

METHODS = ("rl", "opd", "combine")

# Loss defaults per method (SPEC §2–§3): weights of the two advantage terms and the KL coefficient.
METHOD_LOSS_DEFAULTS = {
    "rl": dict(w_rl=1.0, w_opd=0.0, kl_coef=0.02),
    "opd": dict(w_rl=0.0, w_opd=1.0, kl_coef=0.0),
    "combine": dict(w_rl=1.0, w_opd=1.0, kl_coef=0.0),
}
# Judge votes per turn per method (SPEC §7: PRM_M default 1; 3 for Binary RL).
METHOD_PRM_M = {"rl": 3, "opd": 1, "combine": 1}


def prm_m_for(method: str, prm_m: int | None = None) -> int:
    """Judge votes per turn: `prm_m`, or when None the method's default (`METHOD_PRM_M`)."""
    return METHOD_PRM_M[method] if prm_m is None else int(prm_m)
