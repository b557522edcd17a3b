"""`intake.admit` at its bounds, without a model: the staleness bound (inclusive; -1 none), the
response-length bound (0 none), the token budget, the top-K width of a step, and rollout
log-probs required only where the loss reads them. The loop's counting and hand-back of drops
are test_trainer_samples'."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from clawjax import intake
from sample_factory import make_samples
from test_trainer import tiny_config

VOCAB = 512


def _admit(sample, topk=None, version=0, **overrides):
    config = tiny_config("unused", **overrides)
    return intake.admit(sample, config, vocab_size=VOCAB, policy_version=version, topk=topk)


def _with_topk(sample, k):
    width = np.full((sample.response_len, k), np.log(1 / k), np.float32)
    ids = np.tile(np.arange(k, dtype=np.int32), (sample.response_len, 1))
    return dataclasses.replace(sample, teacher_topk_logp=width, teacher_topk_ids=ids)


@pytest.mark.parametrize("bound, behind, reason", [
    (2, 2, None), (2, 3, "stale"), (0, 0, None), (0, 1, "stale"), (-1, 10 ** 6, None)])
def test_the_staleness_bound_is_inclusive_and_minus_one_is_none(bound, behind, reason):
    sample = make_samples(1)[0]   # sampled at version 0
    assert _admit(sample, version=behind, **{"trainer.max_staleness": bound}) == reason


def test_a_response_over_max_response_len_is_too_long_and_zero_is_no_bound():
    sample = make_samples(1, min_len=40, max_len=40)[0]
    n = sample.response_len
    assert _admit(sample, **{"trainer.max_response_len": n}) is None
    assert _admit(sample, **{"trainer.max_response_len": n - 1}) == "too_long"
    assert _admit(sample, **{"trainer.max_response_len": 0}) is None
    assert _admit(sample, **{"trainer.token_budget": 39}) == "too_long"


def test_one_step_admits_one_top_k_width():
    """The width is the step's first top-K sample's, or `rollout.teacher_topk` when set."""
    sample = _with_topk(make_samples(1)[0], 4)
    assert _admit(sample) is None and _admit(sample, topk=4) is None
    assert _admit(sample, topk=8) == "invalid"
    assert _admit(sample, **{"rollout.teacher_topk": 8}) == "invalid"
    assert _admit(sample, topk=8, **{"rollout.teacher_topk": 4}) is None


def test_rollout_logprobs_are_required_only_where_the_loss_reads_them():
    bare = dataclasses.replace(make_samples(1)[0], rollout_logp=None)
    assert _admit(bare, **{"loss.old_logp": "rollout"}) == "invalid"
    assert _admit(bare, **{"loss.old_logp": "recompute"}) is None
    assert _admit(bare, **{"loss.old_logp": "recompute", "loss.use_tis": True}) == "invalid"


def test_an_invalid_sample_is_invalid_whatever_else_holds():
    sample = make_samples(1)[0]
    sample.tokens[0] = VOCAB   # out of the vocabulary
    assert _admit(sample) == "invalid"
