"""The regression gate: a candidate policy is published only if it does not score worse than the
serving policy on a held-out probe set by more than a margin.

The probe score is the mean log-probability of the probe samples' response tokens (loss-masked,
token mean), computed in-process with the trainer's own forward: cheap, deterministic, and it
collapses for a corrupted candidate (NaN or wildly moved parameters). A NaN score always fails.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from clawjax import batch as batch_lib
from clawjax import losses
from clawjax.sample import Sample


@dataclasses.dataclass
class GateDecision:
    passed: bool
    candidate: float
    serving: float
    margin: float

    def describe(self) -> str:
        verdict = "passed" if self.passed else "REFUSED"
        return (f"regression gate {verdict}: probe score {self.candidate:.4f} vs serving "
                f"{self.serving:.4f} (margin {self.margin})")


def _data_parallel(params) -> int:
    """data × fsdp of the mesh `params` are sharded on (1 for arrays off a named mesh)."""
    for leaf in jax.tree.leaves(params):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if mesh is not None and {"data", "fsdp"} <= set(mesh.shape):
            return int(mesh.shape["data"] * mesh.shape["fsdp"])
    return 1


class RegressionGate:
    """Scores parameters on fixed probe samples; `check` compares a candidate with the serving
    policy's score (remembered from the last `accept`)."""

    def __init__(self, graphdef, probe: list[Sample], margin: float, token_budget: int,
                 chunk: int = 1024):
        if not probe:
            raise ValueError("gate probe set is empty: expected at least one probe sample")
        if margin < 0:
            raise ValueError(f"gate.margin = {margin}, expected a value ≥ 0")
        self.margin = margin
        self._probe, self._token_budget = list(probe), token_budget
        # Validates the probe now; `score` packs it again for a mesh that splits rows.
        self.batches = batch_lib.pack(probe, token_budget, need_rollout_logp=False)  # no ratio
        self._row_multiple = 1
        self.serving_score: float | None = None

        @jax.jit
        def terms(params, batch):
            model = nnx.merge(graphdef, params)
            hidden = model.hidden(batch.tokens, batch.positions, batch.segment_ids)
            logp, _ = losses.sequence_logp_and_entropy(
                hidden, model.lm_head(), batch.tokens, batch.segment_ids, chunk=chunk)
            return losses.reduce(logp, batch.loss_mask, batch.segment_ids, "token_mean")

        self._terms = terms

    def _batches_for(self, params) -> list:
        """The probe batches for `params`' mesh: each row count a multiple of its data × fsdp,
        as the trainer packs its own (a Pallas attention kernel splits rows over those axes,
        `clawjax.model.kernel_attention`). Padding rows are all zeros: `losses.reduce` counts
        no token of them, so the score is the same for any multiple."""
        multiple = _data_parallel(params)
        if multiple != self._row_multiple:
            self.batches = batch_lib.pack(self._probe, self._token_budget, row_multiple=multiple,
                                          need_rollout_logp=False)
            self._row_multiple = multiple
        return self.batches

    def score(self, params) -> float:
        """Mean log-prob of the probe responses under `params` (higher is better)."""
        total, count = 0.0, 0.0
        for b in self._batches_for(params):
            s, c = self._terms(params, b)
            total, count = total + float(s), count + float(c)
        return total / max(count, 1.0)

    def accept(self, params, score: float | None = None) -> float:
        """Records `params` as the serving policy; returns its score. Pass the `score` that
        `check(params).candidate` already computed to skip scoring them again."""
        self.serving_score = self.score(params) if score is None else float(score)
        return self.serving_score

    def check(self, params) -> GateDecision:
        candidate = self.score(params)
        serving = self.serving_score if self.serving_score is not None else candidate
        passed = math.isfinite(candidate) and candidate >= serving - self.margin
        return GateDecision(passed, candidate, serving, self.margin)
