"""clawjax.sample: the log-prob floor and the top-K rules of `Sample.validate` (distinct ids per
row, row probability ≤ 1, top-K only on OPD samples)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clawjax.sample import LOGP_FLOOR, TOPK_MASS_SLACK, Sample, SampleError

R = 2


def opd(**changes) -> Sample:
    """A valid OPD sample with top-K data (K = 3, rows of mass 0.85 and 0.6), with `changes`."""
    kw = dict(sample_id="t", tokens=[1, 2, 3, 4], response_len=R, kind="opd",
              rollout_logp=[-0.5, -1.0], teacher_logp=[-0.4, -2.0],
              teacher_topk_logp=np.log([[0.5, 0.25, 0.1], [0.3, 0.2, 0.1]]),
              teacher_topk_ids=[[7, 8, 9], [1, 2, 3]])
    kw.update(changes)
    return Sample(**kw)


def refusal(sample: Sample, field: str) -> str:
    with pytest.raises(SampleError) as info:
        sample.validate()
    assert info.value.field == field, str(info.value)
    assert f"sample 't': field {field!r} = " in str(info.value)
    return str(info.value)


def test_the_valid_sample_passes():
    assert opd().validate().kind == "opd"


# ---------------------------------------------------------------- 1. distinct ids in a row
@pytest.mark.parametrize("ids,row,token", [
    ([[7, 8, 9], [1, 2, 1]], 1, 1),
    ([[9, 9, 9], [1, 2, 3]], 0, 9),
    ([[7, 8, 9], [0, 0, 3]], 1, 0),
])
def test_a_top_k_row_naming_one_id_twice_is_refused_naming_the_row(ids, row, token):
    """Two bins at one id would count the student's probability there twice."""
    message = refusal(opd(teacher_topk_ids=ids), "teacher_topk_ids")
    assert f"'row {row} holds id {token} twice'" in message
    assert "distinct token ids in each row" in message


def test_the_same_id_in_different_rows_is_fine():
    opd(teacher_topk_ids=[[1, 2, 3], [1, 2, 3]]).validate()
    opd(teacher_topk_logp=[[-0.1], [-0.2]], teacher_topk_ids=[[5], [5]]).validate()   # K = 1


# ---------------------------------------------------------------- 2. probability ≤ 1 per row
@pytest.mark.parametrize("row", [0, 1])
@pytest.mark.parametrize("probs", [[0.6, 0.5, 0.1], [1.0, 0.01, 0.0001], [0.9, 0.9, 0.9]])
def test_a_top_k_row_with_probability_above_one_is_refused_naming_the_row(row, probs):
    topk = np.log([[0.5, 0.25, 0.1], [0.3, 0.2, 0.1]])
    topk[row] = np.log(probs)
    message = refusal(opd(teacher_topk_logp=topk), "teacher_topk_logp")
    assert f"'row {row} with logsumexp " in message
    assert f"logsumexp ≤ TOPK_MASS_SLACK = {TOPK_MASS_SLACK:g}" in message


def test_top_k_rows_within_float32_rounding_of_one_are_accepted():
    """The K log-probs of a float32 softmax may sum a little above 1; whole distributions
    (K = the vocabulary) and rows up to logsumexp = TOPK_MASS_SLACK are kept."""
    rng = np.random.default_rng(0)
    for k in (2, 50, 1024):
        logits = rng.normal(scale=4.0, size=(R, k)).astype(np.float32)
        full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))    # float32 softmax
        ids = np.tile(np.arange(k), (R, 1))
        opd(teacher_topk_logp=full, teacher_topk_ids=ids).validate()
    near = np.log([[0.5, 0.5], [0.7, 0.3]]) + TOPK_MASS_SLACK * 0.9
    opd(teacher_topk_logp=near, teacher_topk_ids=[[1, 2], [1, 2]]).validate()
    over = np.log([[0.5, 0.5], [0.7, 0.3]]) + TOPK_MASS_SLACK * 1.5
    message = refusal(opd(teacher_topk_logp=over, teacher_topk_ids=[[1, 2], [1, 2]]),
                      "teacher_topk_logp")
    assert "'row 0 with logsumexp 0.0015" in message
    assert TOPK_MASS_SLACK <= 1e-3 and math.exp(TOPK_MASS_SLACK) < 1.0011


def test_a_top_k_row_of_a_clamped_top_one_is_accepted():
    """The rollout side clamps a teacher log-prob rounded up to ≤ 1e-3 above 0 to 0; the rest
    of such a row carries almost no probability."""
    topk = [[0.0, -12.0, -14.0], [-0.5, -1.5, -3.0]]
    opd(teacher_topk_logp=topk).validate()


# ---------------------------------------------------------------- 3. top-K only on OPD samples
def test_top_k_data_on_an_rl_sample_is_refused_naming_the_kind():
    rl = opd(kind="rl", teacher_logp=None, reward=1.0)
    message = refusal(rl, "kind")
    assert "'opd' or 'both' when teacher_topk_logp and teacher_topk_ids are present" in message
    opd(kind="both", reward=1.0).validate()
    opd(kind="rl", teacher_logp=None, teacher_topk_logp=None, teacher_topk_ids=None).validate()


def test_malformed_top_k_data_on_an_rl_sample_is_named_by_its_own_field():
    rl = dict(kind="rl", teacher_logp=None)
    refusal(opd(teacher_topk_logp=[[-0.1, 0.5, -1.0], [-1.0, -2.0, -3.0]], **rl),
            "teacher_topk_logp")
    refusal(opd(teacher_topk_ids=[[1, 2], [3, 4]], **rl), "teacher_topk_ids")


# ---------------------------------------------------------------- 4. the log-prob floor
FLOAT32_LOWEST = float(np.finfo(np.float32).min)
JUST_BELOW = float(np.nextafter(np.float32(LOGP_FLOOR), np.float32(-np.inf)))   # -1e6 - 1/16


@pytest.mark.parametrize("field", ["rollout_logp", "teacher_logp", "teacher_topk_logp"])
@pytest.mark.parametrize("low", [FLOAT32_LOWEST, -1e30, -1e7, JUST_BELOW])
def test_a_log_prob_below_the_floor_is_refused_naming_the_floor(field, low):
    """teacher_logp ≈ -3.4e38 made w_opd · (teacher − old) overflow to -inf for w_opd > 1."""
    value = getattr(opd(), field).copy()
    value.flat[-1] = low
    message = refusal(opd(**{field: value}), field)
    assert f"= {float(np.float32(low))!r}," in message
    assert "log-probs ≥ LOGP_FLOOR = -1e+06" in message


@pytest.mark.parametrize("field", ["rollout_logp", "teacher_logp", "teacher_topk_logp"])
def test_log_probs_at_the_floor_and_the_wire_negligible_value_are_accepted(field):
    """The serving side sends a -inf log-prob as -9999.0 (OpenAI's negligible)."""
    assert LOGP_FLOOR == -1e6
    for low in (-9999.0, LOGP_FLOOR):
        value = getattr(opd(), field).copy()
        value.flat[-1] = low
        opd(**{field: value}).validate()


def test_the_floor_keeps_the_opd_advantage_finite_in_float32():
    low, high = np.float32(LOGP_FLOOR), np.float32(0.0)
    for w_opd in (np.float32(2.0), np.float32(1e6)):
        assert np.isfinite(w_opd * (low - high)) and np.isfinite(w_opd * (high - low))
