"""The judge loop (`JudgeLoop` + `Pusher`) with the rule judge's answers and scripted teacher
answers: no turn is lost without being counted, a teacher's failure costs the OPD part only."""

from __future__ import annotations

import asyncio
import types

import numpy as np
import pytest

from clawjax.rollout import emit, judge_loop, rule_judge
from clawjax.rollout.pusher import Pusher
from clawjax.rollout.sessions import EpisodeEnd, JudgeJob, NextState
from clawjax.serving.teacher import parse_teacher_response
from rollout_turns import turn


def test_a_judge_loop_refuses_a_top_k_out_of_range():
    for k in (-1, 1025):
        with pytest.raises(ValueError, match=f"teacher_topk = {k}, expected 0"):
            judge_loop.JudgeLoop(judge=None, teacher=None, encode=None, pusher=None,
                                 stats=emit.Stats(), method="combine", m=1, teacher_topk=k)


# --- the judge loop never loses a turn without counting it -----------------------------------

class RuleJudgeClient:
    """The rule judge's answers (`rule_judge.answer`), in process."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    async def chat_completions(self, body, timeout=None):
        if self.fail:
            raise RuntimeError("judge client bug")
        return {"choices": [{"message": {"content": rule_judge.answer(body["messages"])}}]}


class ScriptedTeacher:
    """A teacher whose `/generate` answer is `answer(prompt_ids, response_ids)`, checked by the
    real `parse_teacher_response`."""

    def __init__(self, answer):
        self.answer = answer

    async def teacher_logprobs(self, prompt_ids, response_ids, top_k=0):
        return parse_teacher_response(self.answer(prompt_ids, response_ids), prompt_ids,
                                      response_ids, top_k)


class ListBuffer:
    def __init__(self):
        self.samples = []

    def push(self, batch):
        self.samples.extend(batch)
        return types.SimpleNamespace(accepted=len(batch), duplicates=0)


CORRECTION = "That's wrong. Please answer with only the final number."  # -1 and a hint


def teacher_answer(logps=(-0.2, -0.3, -0.4), tops=None):
    def answer(prompt_ids, response_ids):
        meta = {"input_token_logprobs": [[None, prompt_ids[-1], None]] + [
            [lp, t, None] for lp, t in zip(logps, response_ids)]}
        if tops is not None:
            meta["input_top_logprobs"] = [None] + tops(response_ids)
        return {"meta_info": meta}
    return answer


def run_judge_loop(answer, *, topk=0, episode=False, judge_fails=False, outcome=1.0):
    """One turn (`rollout_turns.turn()`, R = 3) judged on CORRECTION by a real JudgeLoop + Pusher."""
    async def main():
        stats, buf = emit.Stats(), ListBuffer()
        pusher = Pusher(buf, stats, linger_s=0).start()
        loop = judge_loop.JudgeLoop(judge=RuleJudgeClient(judge_fails),
                                    teacher=ScriptedTeacher(answer),
                                    encode=lambda m, t: [1, 2, 3, 9], pusher=pusher,
                                    stats=stats, method="combine", m=1, teacher_topk=topk)
        events = [JudgeJob(turn(), NextState("user", CORRECTION), episode)]
        if episode:
            events.append(EpisodeEnd("s", outcome))
        loop.handle(events)
        assert await loop.idle(30)
        await pusher.aclose()
        return stats.snapshot(), buf.samples
    return asyncio.run(main())


def counts(snap):
    """The non-zero emitted kinds and drop reasons of a Stats snapshot."""
    return ({k: v for k, v in snap["emitted"].items() if v},
            {k: v for k, v in snap["drops"].items() if v})


@pytest.mark.parametrize("name,answer,topk", [
    ("first entry an object", lambda p, r: {"meta_info": {"input_token_logprobs": [
        {"logprob": None, "id": p[-1]}] + [[-0.2, t, None] for t in r]}}, 0),
    ("null top-K entries", teacher_answer(tops=lambda r: [[None, None] for _ in r]), 2),
    ("a top-K row that is an object", teacher_answer(tops=lambda r: [{"a": 1} for _ in r]), 1),
    ("a log-prob well above 0", teacher_answer(logps=(-0.2, 0.5, -0.4)), 0),
    ("a top-K log-prob well above 0",
     teacher_answer(tops=lambda r: [[[0.5, t, None]] for t in r]), 1),
    ("a teacher that raises", lambda p, r: 1 / 0, 0),
])
def test_a_malformed_teacher_answer_keeps_the_rl_part_and_counts_teacher_failure(name, answer,
                                                                                 topk):
    snap, pushed = run_judge_loop(answer, topk=topk)
    assert counts(snap) == ({"rl": 1}, {"teacher_failure": 1}), name
    assert snap["judged_turns"] == 1 and snap["push"]["pushed"] == 1
    assert [(s.kind, s.reward, s.teacher_logp) for s in pushed] == [("rl", -1.0, None)]


def test_teacher_rounding_above_zero_is_clamped_not_lost():
    snap, pushed = run_judge_loop(
        teacher_answer(logps=(-0.2, 1e-7, 5e-4),
                       tops=lambda r: [[[1e-7, t, None], [-30.0, 0, None]] for t in r]), topk=2)
    assert counts(snap) == ({"both": 1}, {})
    s = pushed[0]
    assert (s.kind, s.reward) == ("both", -1.0)
    np.testing.assert_array_equal(s.teacher_logp, np.array([-0.2, 0.0, 0.0], np.float32))
    np.testing.assert_array_equal(s.teacher_topk_logp[:, 0], [0.0] * 3)
    assert s.metadata["hint"] == "Please answer with only the final number."
    assert emit.POSITIVE_LOGP_SLACK == 1e-3     # the proxy clamps rollout log-probs alike


def test_an_unexpected_judging_failure_counts_the_turn():
    snap, pushed = run_judge_loop(teacher_answer(), judge_fails=True)
    assert counts(snap) == ({}, {"invalid": 1}) and pushed == []
    # An episode's held step: counted too, and the episode still ends.
    snap, pushed = run_judge_loop(teacher_answer(), judge_fails=True, episode=True)
    assert counts(snap) == ({}, {"invalid": 1}) and pushed == [] and snap["episodes"] == 1
