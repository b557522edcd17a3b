"""clawjax.sample: construction refuses silent casts; validate's errors name the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clawjax.sample import Sample, SampleError
from clawjax.sources import ReplayError, read_replay


def base(**changes) -> dict:
    kw = dict(sample_id="x", tokens=[1, 2, 3, 4], response_len=2)
    kw.update(changes)
    return kw


def refused(field: str, shown: str, **changes) -> SampleError:
    """The SampleError of `Sample(**base(**changes)).validate()`, checked to name the sample,
    `field` and the offending value as `shown`."""
    with pytest.raises(SampleError) as info:
        Sample(**base(**changes)).validate()
    message = str(info.value)
    assert info.value.field == field, message
    assert f"sample 'x': field {field!r} = {shown}," in message, message
    return info.value


# ---------------------------------------------------------------- construction: no silent casts
@pytest.mark.parametrize("field,value,shown", [
    ("tokens", np.array([1, 2, 2**32 + 7], np.int64), "4294967303"),      # would wrap to 7
    ("tokens", [1, 2, 2**31], "2147483648"),
    ("tokens", np.array([1, 2, 2**63], np.uint64), "9223372036854775808"),
    ("tokens", [1.0, 2.0, 3.9], "3.9"),                                    # would truncate to 3
    ("tokens", [1.0, 2.0, float("nan")], "nan"),
    ("tokens", [1.0, 2.0, float("inf")], "inf"),
    ("tokens", np.array(["1", "2", "3"]), "'dtype <U1'"),
    ("teacher_topk_ids", np.array([[2**32 + 1], [3]], np.int64), "4294967297"),
    ("teacher_topk_ids", [[0.5], [3.0]], "0.5"),
])
def test_token_ids_a_cast_would_corrupt_are_refused_naming_the_field(field, value, shown):
    changes = {field: value}
    if field == "teacher_topk_ids":
        changes["teacher_topk_logp"] = [[-0.1], [-0.2]]
    else:
        changes["response_len"] = 1
    error = refused(field, shown, **changes)
    assert "int32" in error.expected


@pytest.mark.parametrize("value,shown", [(1.7, "1.7"), (1.5, "1.5"), ("2", "'2'"),
                                         (True, "True"), (None, "None")])
def test_response_len_must_be_an_integer(value, shown):
    error = refused("response_len", shown, response_len=value)
    assert error.expected == "an integer"


@pytest.mark.parametrize("line,field,shown", [
    ('{"sample_id":"x","tokens":[1,2,3],"response_len":1.5}', "response_len", "1.5"),
    ('{"sample_id":"x","tokens":[1,2,3.7],"response_len":1}', "tokens", "3.7"),
    ('{"sample_id":"x","tokens":[1,2,4294967303],"response_len":1}', "tokens", "4294967303"),
])
def test_from_json_refuses_them_naming_the_field(line, field, shown):
    with pytest.raises(SampleError) as info:
        Sample.from_json(line)
    assert info.value.field == field
    assert f"field {field!r} = {shown}," in str(info.value)


def test_from_json_wants_the_rollout_logprobs():
    """A replay line without `rollout_logp` would train against zeros (probability 1) as the old
    policy: refused naming the field, while a line that has them loads."""
    with pytest.raises(SampleError) as info:
        Sample.from_json('{"sample_id":"x","tokens":[1,2,3],"response_len":2}')
    assert info.value.field == "rollout_logp" and "required" in str(info.value)
    line = '{"sample_id":"x","tokens":[1,2,3],"response_len":2,"rollout_logp":[-0.5,-1.0]}'
    assert Sample.from_json(line).rollout_logp.tolist() == [-0.5, -1.0]


def test_omitted_rollout_logprobs_stay_unknown_not_zeros():
    """Zeros would be a made-up old policy of probability 1: an omitted `rollout_logp` is None
    (valid in process: SFT data, probes), left out of the JSON line, which then does not load."""
    s = Sample(**base())
    assert s.rollout_logp is None and s.validate() is s
    assert "rollout_logp" not in s.to_json_dict() and s.num_bytes == Sample(**base()).num_bytes
    with pytest.raises(SampleError) as info:
        Sample.from_json(s.to_json())
    assert info.value.field == "rollout_logp"
    assert not s.equals(Sample(**base(rollout_logp=[0.0, 0.0])))


@pytest.mark.parametrize("tokens", [
    [1, 2, 3], np.array([1, 2, 3], np.int8), np.array([1, 2, 3], np.int16),
    np.array([1, 2, 3], np.int64), np.array([1, 2, 3], np.uint32), np.array([1, 2, 3], np.uint64),
    np.array([1, 2, 3], ">i4"), [1.0, 2.0, 3.0]])
def test_integer_ids_of_any_width_that_fit_int32_are_accepted(tokens):
    s = Sample(**base(tokens=tokens, response_len=1, kind="opd", teacher_logp=[-0.5],
                      teacher_topk_logp=[[-1.0, -2.0]], teacher_topk_ids=np.asarray([tokens[:2]])))
    s.validate()
    assert s.tokens.dtype == np.int32 and s.tokens.tolist() == [1, 2, 3]
    assert s.teacher_topk_ids.dtype == np.int32 and s.teacher_topk_ids.tolist() == [[1, 2]]


def test_int32_limits_empty_arrays_and_whole_float_response_len_are_kept():
    limits = Sample(**base(tokens=np.array([-2**31, 2**31 - 1, 0], np.int64), response_len=1))
    assert limits.tokens.tolist() == [-2**31, 2**31 - 1, 0]   # validate refuses the negative
    ids = np.arange(4, dtype=np.int32)
    assert Sample(**base(tokens=ids)).tokens is ids            # int32 input: no copy
    empty = Sample(**base(teacher_topk_logp=np.zeros((0, 3)), teacher_topk_ids=np.zeros((0, 3))))
    assert empty.teacher_topk_ids.dtype == np.int32 and empty.teacher_topk_ids.shape == (0, 3)
    assert Sample(**base(response_len=2.0)).response_len == 2
    assert Sample(**base(response_len=np.int64(2))).validate().response_len == 2
    back = Sample.from_json(Sample(**base(rollout_logp=[-0.5, -1.0])).to_json())
    assert back.tokens.dtype == np.int32 and back.response_len == 2


# ---------------------------------------------------------------- validate
@pytest.mark.parametrize("value,shown", [(1.0, "[1.0]"), (float("nan"), "[nan]"),
                                         ([[1.0, 2.0]], "[1.0, 2.0]")])
def test_step_rewards_that_are_not_1d_are_refused_with_a_sample_error(value, shown):
    error = refused("step_rewards", shown, step_rewards=value)
    assert error.expected.startswith("a 1-D array of finite floats (got ")


def test_a_replay_line_with_a_scalar_step_rewards_is_a_replay_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"sample_id": "a", "tokens": [1, 2, 3], "response_len": 1,
                                "rollout_logp": [-0.5], "step_rewards": 0.5}) + "\n")
    with pytest.raises(ReplayError, match=r"r\.jsonl:1: sample 'a': field 'step_rewards'"):
        read_replay(str(path))


def test_an_opd_sample_must_carry_reward_zero():
    """SPEC §2: OPD-only samples carry r = 0; a reward there would be trained as RL."""
    opd = dict(kind="opd", rollout_logp=[-1.0, -1.0], teacher_logp=[-1.0, -1.0])
    for reward in (1.0, -1.0, 1e-9):
        error = refused("reward", repr(reward), reward=reward, **opd)
        assert error.expected.startswith("0 for kind 'opd'")
    for reward in (0.0, -0.0):
        Sample(**base(reward=reward, **opd)).validate()
    Sample(**base(reward=1.0, **dict(opd, kind="both"))).validate()
