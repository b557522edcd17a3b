"""Sample emission by method (pure, `emit.build_samples` / `lone_sample`): kinds, rewards and
drop reasons per method, episodes' outcome rewards, top-K riding with the OPD part only, invalid
samples, and policy versions from weight-version labels."""

from __future__ import annotations

import numpy as np
import pytest

from clawjax.rollout import emit
from clawjax.rollout.sessions import NextState
from rollout_turns import HINT, TEACHER, turn, verdict


@pytest.mark.parametrize("method,reward,hint,teacher,kinds,drops", [
    ("rl", 1, None, None, [("rl", 1.0)], []),
    ("rl", -1, HINT, TEACHER, [("rl", -1.0)], []),
    ("rl", 0, HINT, TEACHER, [], ["zero_reward"]),
    ("opd", 0, HINT, TEACHER, [("opd", 0.0)], []),
    ("opd", 1, None, None, [], ["no_valid_hint"]),
    ("opd", 1, HINT, None, [], ["teacher_failure"]),
    ("combine", -1, HINT, TEACHER, [("both", -1.0)], []),
    ("combine", 1, None, None, [("rl", 1.0)], ["no_valid_hint"]),
    ("combine", 1, HINT, None, [("rl", 1.0)], ["teacher_failure"]),
    ("combine", 0, HINT, TEACHER, [("opd", 0.0)], ["zero_reward"]),
    ("combine", 0, None, None, [], ["zero_reward", "no_valid_hint"]),
])
def test_emission_by_method(method, reward, hint, teacher, kinds, drops):
    out, why = emit.build_samples(turn(), NextState("user", "x"), verdict(reward, hint), method,
                                  teacher)
    assert [(s.kind, s.reward) for s in out] == kinds and why == drops
    for s in out:
        s.validate()
        assert s.tokens.tolist() == [1, 2, 3, 4, 10, 11, 12] and s.response_len == 3
        assert s.policy_version == 7 and s.session_id == "s" and s.loss_mask.tolist() == [1] * 3
        assert s.metadata["next_state_role"] == "user" and s.metadata["method"] == method
        if s.kind in ("opd", "both"):
            np.testing.assert_array_equal(s.teacher_logp, TEACHER)
            assert s.metadata["hint"] == HINT
        else:
            assert s.teacher_logp is None


@pytest.mark.parametrize("method,process,outcome,hint,teacher,kinds,drops", [
    ("rl", 0, 1.0, None, None, [("rl", 1.0)], []),              # judged 0, trained on outcome
    ("rl", 1, 1.0, None, None, [("rl", 2.0)], []),
    ("rl", -1, 1.0, None, None, [], ["zero_reward"]),           # the sum is 0
    ("rl", 1, None, None, None, [("rl", 1.0)], []),             # ended without an outcome: 0
    ("combine", -1, 0.0, HINT, TEACHER, [("both", -1.0)], []),
    ("combine", -1, 1.0, HINT, TEACHER, [("opd", 0.0)], ["zero_reward"]),
    ("opd", 0, 1.0, HINT, TEACHER, [("opd", 0.0)], []),         # OPD carries no reward
])
def test_episode_steps_add_the_outcome_to_the_judged_reward(method, process, outcome, hint,
                                                            teacher, kinds, drops):
    steps = [1.0, float(process), -1.0]
    out, why = emit.build_samples(turn(), NextState("tool", "x"), verdict(process, hint), method,
                                  teacher, episode=True, outcome_reward=outcome,
                                  step_rewards=steps)
    assert [(s.kind, s.reward) for s in out] == kinds and why == drops
    for s in out:
        s.validate()
        np.testing.assert_array_equal(s.step_rewards, steps)
        assert s.metadata["outcome_reward"] == ("none" if outcome is None else repr(outcome))
        assert float(s.metadata["process_reward"]) == process
    lone, _ = emit.lone_sample(turn(), method, episode=True, outcome_reward=outcome)
    assert lone[0].reward == (0.0 if method == "opd" or outcome is None else outcome)


TOPK = (np.array([[-0.2, -2.0], [-0.2, -1.9], [-0.3, -1.5]], np.float32),
        np.array([[11, 5], [12, 7], [12, 13]], np.int32))


@pytest.mark.parametrize("method,reward,hint,teacher,kinds", [
    ("combine", -1, HINT, TEACHER, ["both"]),
    ("opd", 0, HINT, TEACHER, ["opd"]),
    ("combine", 1, None, None, ["rl"]),      # no OPD part: top-K is not kept
    ("rl", 1, HINT, TEACHER, ["rl"]),
])
def test_teacher_topk_rides_with_the_opd_part_only(method, reward, hint, teacher, kinds):
    out, _ = emit.build_samples(turn(), NextState("user", "x"), verdict(reward, hint), method,
                                teacher, teacher_topk=TOPK)
    assert [s.kind for s in out] == kinds
    s = out[0].validate()
    if s.kind in ("opd", "both"):
        np.testing.assert_array_equal(s.teacher_topk_logp, TOPK[0])
        np.testing.assert_array_equal(s.teacher_topk_ids, TOPK[1])
    else:
        assert s.teacher_topk_logp is None and s.teacher_topk_ids is None


def test_emission_rejects_invalid_samples_and_unknown_methods():
    bad = turn()
    bad.rollout_logp = [0.5, -1, -1]                            # a positive log-prob
    out, why = emit.build_samples(bad, NextState("user", "x"), verdict(1), "rl")
    assert out == [] and why == ["invalid"]
    with pytest.raises(ValueError, match="method"):
        emit.build_samples(turn(), NextState("user", "x"), verdict(1), "ppo")
    out, why = emit.lone_sample(turn(), "combine")
    assert [(s.kind, s.reward, s.metadata["lone_turn"]) for s in out] == [("rl", 0.0, "1")]
    stats = emit.Stats()
    stats.count(out, ["zero_reward", "no_valid_hint"])
    stats.count_judgement(verdict(1, HINT, votes=[1, None, 1]), has_prm=True)
    snap = stats.snapshot()
    assert snap["emitted"] == {"rl": 1, "opd": 0, "both": 0}
    assert snap["drops"]["zero_reward"] == 1 and snap["drops"]["no_valid_hint"] == 1
    assert snap["votes"] == {"1": 2, "0": 0, "-1": 0, "invalid": 1}
    assert snap["hint_share"] == 1.0 and snap["rewards"]["1"] == 1


@pytest.mark.parametrize("label,want", [("default", 0), ("12", 12), ("step_40", 40), ("", 0),
                                        (None, 0), ("v3-final", 0)])
def test_policy_version_of_weight_version_labels(label, want):
    assert emit.policy_version_of(label) == want



def test_a_both_sample_whose_teacher_part_is_invalid_keeps_its_rl_part():
    for teacher_logp in (np.array([-0.1, 0.5, -0.3], np.float32),       # positive
                         np.array([-0.1, -0.2], np.float32)):            # wrong length
        out, why = emit.build_samples(turn(), NextState("user", "x"), verdict(-1, HINT),
                                      "combine", teacher_logp)
        assert [(s.kind, s.reward, s.teacher_logp) for s in out] == [("rl", -1.0, None)]
        assert why == ["teacher_failure"]
    bad = turn()
    bad.rollout_logp = [0.5, -1, -1]                       # the RL part is broken too: invalid
    out, why = emit.build_samples(bad, NextState("user", "x"), verdict(-1, HINT), "combine",
                                  TEACHER)
    assert out == [] and why == ["invalid"]
