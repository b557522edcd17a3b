"""The session state machine (pure), sample emission by method (pure), and the judge loop
with the rule judge's answers and scripted teacher answers (no turn lost uncounted)."""

from __future__ import annotations

import asyncio
import dataclasses
import types

import numpy as np
import pytest

from clawjax.rollout import emit, judge_loop, rule_judge, sessions
from clawjax.rollout.judge import Judgement
from clawjax.rollout.pusher import Pusher
from clawjax.rollout.sessions import (Dropped, EpisodeEnd, JudgeJob, LoneTurn, NextState,
                                      SessionTable, Turn)
from clawjax.serving.teacher import parse_teacher_response


def turn(sid="s", index=0, r=3, version="7") -> Turn:
    return Turn(session_id=sid, turn_index=index, messages=[{"role": "user", "content": "q"}],
                prompt_ids=[1, 2, 3, 4], response_ids=list(range(10, 10 + r)),
                rollout_logp=[-0.5] * r, weight_version=version, response_text="a",
                created_unix_ms=5)


def msgs(*roles_texts):
    return [{"role": r, "content": t} for r, t in roles_texts]


def test_next_state_is_the_trailing_user_or_tool_messages():
    assert sessions.next_state_of(msgs(("user", "q"))) is None            # nothing before it
    assert sessions.next_state_of(msgs(("user", "q"), ("assistant", "a"))) is None
    assert sessions.next_state_of(msgs(("user", "q"), ("assistant", "a"), ("user", "thx"))) == \
        NextState("user", "thx")
    assert sessions.next_state_of(msgs(("user", "q"), ("assistant", "call"), ("tool", "OK 1"),
                                       ("tool", "OK 2"))) == NextState("tool", "OK 1\nOK 2")
    parts = [{"role": "assistant", "content": "a"},
             {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text",
                                                                             "text": "there"}]}]
    assert sessions.next_state_of(parts) == NextState("user", "hi there")


def test_a_session_walks_through_its_turns():
    table = SessionTable(idle_expiry_s=10)
    i, ev = table.begin("s", "main", msgs(("user", "q")), now=0)
    assert (i, ev) == (0, [])
    t0 = turn(index=0)
    assert table.finish(t0, now=1) == []
    # A side turn is served, indexed, and never a next state.
    i, ev = table.begin("s", "side", msgs(("user", "q"), ("assistant", "a"), ("user", "ok")), 2)
    assert (i, ev) == (1, [])
    i, ev = table.begin("s", "main", msgs(("user", "q"), ("assistant", "a"), ("user", "no")), 3)
    assert i == 2 and ev == [JudgeJob(t0, NextState("user", "no"))]
    t2 = turn(index=2)
    table.finish(t2, now=4)
    # A main request ending in an assistant message carries no next state; t2 stays pending
    # until t3 replaces it (then t2 can never get one).
    i, ev = table.begin("s", "main", msgs(("user", "q"), ("assistant", "a")), 5)
    assert (i, ev) == (3, [])
    t3 = turn(index=3)
    assert table.finish(t3, now=6) == [Dropped(t2, "no_next_state")]
    assert table.close("s") == [Dropped(t3, "no_next_state")]      # last turn: not trained
    assert "s" not in table and table.close("s") == []


def test_a_retried_request_is_not_the_next_state_of_its_own_first_answer():
    """A client that re-sends request k (a timeout retry, a regeneration) must not have turn k
    judged against the message turn k answered: that message came before turn k, not after."""
    table = SessionTable(idle_expiry_s=10)
    table.begin("s", "main", msgs(("user", "q")), 0)
    t0 = turn(index=0)
    table.finish(t0, 1)
    second = msgs(("user", "q"), ("assistant", "a"), ("user", "That's wrong. Please redo."))
    _, ev = table.begin("s", "main", second, 2)
    assert ev == [JudgeJob(t0, NextState("user", "That's wrong. Please redo."))]
    t1 = dataclasses.replace(turn(index=1), messages=second)
    assert table.finish(t1, 3) == []
    table.end("s", 1, 3)
    _, ev = table.begin("s", "main", list(second), 4)       # the same request again
    assert ev == []                                         # t1 is not judged on its prompt
    t2 = dataclasses.replace(turn(index=2), messages=second)
    assert table.finish(t2, 5) == [Dropped(t1, "no_next_state")]   # the client took t2
    third = second + msgs(("assistant", "b"), ("user", "Thanks!"))
    _, ev = table.begin("s", "main", third, 6)
    assert ev == [JudgeJob(t2, NextState("user", "Thanks!"))]


def test_single_turn_sessions_are_emitted_and_idle_sessions_expire():
    table = SessionTable(idle_expiry_s=10)
    table.begin("a", "main", msgs(("user", "q")), 0)
    ta = turn("a")
    table.finish(ta, 1)
    table.end("a", 0, 1)
    table.begin("b", "side", msgs(("user", "q")), 0)            # only a side turn: nothing
    table.end("b", 0, 0)
    table.begin("c", "main", msgs(("user", "q")), 0)
    table.finish(turn("c"), 8)
    table.end("c", 0, 8)
    assert table.expire(now=11.5) == [LoneTurn(ta)] and "b" not in table and "c" in table
    assert len(table.expire(now=18.5)) == 1 and len(table) == 0
    with pytest.raises(ValueError, match="turn_type"):
        table.begin("x", "tool", [], 0)
    with pytest.raises(ValueError, match="idle_expiry_s"):
        SessionTable(0)


def test_a_request_in_flight_keeps_its_session_open():
    """A generation slower than the idle expiry must not close its own session: the turn it
    produces still belongs to it (no spurious lone turn), and the session expires only once
    the request has ended and the session then idles."""
    table = SessionTable(idle_expiry_s=0.5)
    table.begin("s", "main", msgs(("user", "q")), 0)
    t0 = turn(index=0)
    table.finish(t0, 0.1)
    table.end("s", 0, 0.1)
    table.begin("s", "main", msgs(("user", "q"), ("assistant", "a"), ("user", "no")), 0.2)
    assert table.expire(now=5.0) == [] and "s" in table           # still generating
    t1 = turn(index=1)
    assert table.finish(t1, 5.1) == []
    table.end("s", 1, 5.1)
    assert table.expire(now=5.2) == [] and "s" in table
    assert table.expire(now=5.7) == [Dropped(t1, "no_next_state")] and "s" not in table
    table.begin("x", "main", msgs(("user", "q")), 0)
    assert table.close_all() == [] and len(table) == 0             # shutdown: in flight too
    table.end("x", 0, 1)                                             # a closed session: no-op
    assert "x" not in table


def test_sessions_do_not_mix():
    table = SessionTable()
    for sid in ("x", "y"):
        table.begin(sid, "main", msgs(("user", sid)), 0)
        table.finish(turn(sid), 0)
    _, ev = table.begin("y", "main", msgs(("user", "y"), ("assistant", "a"), ("user", "t")), 1)
    assert [e.turn.session_id for e in ev] == ["y"]
    _, ev = table.begin("y", "main", msgs(("user", "y"), ("assistant", "a"), ("user", "t")), 1)
    assert ev == []                                             # each turn is judged once


def test_an_episode_session_marks_its_jobs_and_ends_with_its_outcome():
    table = SessionTable(idle_expiry_s=10)
    table.begin("e", "main", msgs(("user", "q")), 0, episode=True)
    t0 = turn("e", 0)
    table.finish(t0, 0)
    _, ev = table.begin("e", "main", msgs(("user", "q"), ("assistant", "a"), ("tool", "OK")), 1)
    assert ev == [JudgeJob(t0, NextState("tool", "OK"), episode=True)]  # the flag is sticky
    t1 = turn("e", 1)
    table.finish(t1, 1)
    assert table.close("e", 1.0) == [Dropped(t1, "no_next_state"), EpisodeEnd("e", 1.0)]
    assert table.close("e", 1.0) == []                                   # already closed
    # A lone episode turn is held too; an expired episode ends without an outcome.
    table.begin("lone", "main", msgs(("user", "q")), 0, episode=True)
    t = turn("lone", 0)
    table.finish(t, 0)
    table.end("lone", 0, 0)
    assert table.expire(now=100) == [LoneTurn(t, episode=True), EpisodeEnd("lone", None)]
    # An outcome sent by a session that never said `episode` ends nothing.
    table.begin("chat", "main", msgs(("user", "q")), 0)
    table.finish(turn("chat", 0), 0)
    assert table.close("chat", 1.0) == [LoneTurn(turn("chat", 0))]


def verdict(reward, hint=None, votes=None):
    return Judgement(votes=votes or [reward], reward=reward, hint_votes=[1 if hint else -1],
                     hint=hint, answers=["\\boxed{%d}" % reward], hint_answers=[""])


TEACHER = np.array([-0.1, -0.2, -0.3], np.float32)
HINT = "Always give the unit."


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


def test_a_judge_loop_refuses_a_top_k_out_of_range():
    for k in (-1, 1025):
        with pytest.raises(ValueError, match=f"teacher_topk = {k}, expected 0"):
            judge_loop.JudgeLoop(judge=None, teacher=None, encode=None, pusher=None,
                           stats=emit.Stats(), method="combine", m=1, teacher_topk=k)


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


# --- a session closed while one of its turns is generating (tombstones) ----------------------

def _walk(table, sid, turns, now=0.0, episode=False):
    """`turns` main turns of `sid`, each given its next state by the next request; returns the
    index of the request that is then left generating (begun, not finished)."""
    u, a, obs = ("user", "q"), ("assistant", "a"), ("user", "Wrong, try again")
    for k in range(turns):
        i, _ = table.begin(sid, "main", msgs(*([u, a, obs] * k + [u])), now + k, episode)
        table.finish(turn(sid, i), now + k)
        table.end(sid, i, now + k)
    i, ev = table.begin(sid, "main", msgs(*([u, a, obs] * turns)), now + turns, episode)
    assert [type(e) for e in ev] == [JudgeJob]              # the last finished turn's state
    return i


def test_a_turn_finishing_after_its_session_closed_is_counted_not_a_new_session():
    """A close-only session_done that arrives while turn 3 generates: the late turn is turn 3
    of a multi-turn session, never a lone turn of a new one; it is dropped (counted) at once."""
    table = SessionTable(idle_expiry_s=10)
    i3 = _walk(table, "s", 3)
    assert table.close("s") == [] and "s" not in table
    t3 = turn("s", i3)
    assert table.finish(t3, 3.5) == [Dropped(t3, "no_next_state")]
    table.end("s", i3, 3.5)
    assert "s" not in table and len(table) == 0 and table.tombstones == 0
    assert table.expire(now=10_000.0) == []
    # An episode's late step: its EpisodeEnd already went out, so it is dropped, not held.
    i = _walk(table, "e", 2, episode=True)
    assert table.close("e", 1.0) == [EpisodeEnd("e", 1.0)]
    late = turn("e", i)
    assert table.finish(late, 3) == [Dropped(late, "no_next_state")] and "e" not in table
    table.end("e", i, 3)
    # A session whose FIRST main turn was generating when it closed (shutdown, or another
    # request's session_done): that turn is its only one and is still emitted, once.
    table.begin("lone", "main", msgs(("user", "q")), 0)
    table.begin("lone", "main", msgs(("user", "q")), 0)      # a second request in flight
    assert table.close_all() == [] and table.tombstones == 1
    t0, t1 = turn("lone", 0), turn("lone", 1)
    assert table.finish(t0, 1) == [LoneTurn(t0)]
    assert table.finish(t1, 1) == [Dropped(t1, "no_next_state")]
    table.end("lone", 0, 1)
    assert table.tombstones == 1                              # one request still to end
    table.end("lone", 1, 1)
    assert table.tombstones == 0 and "lone" not in table


def test_tombstones_are_bounded_in_number_and_age():
    table = SessionTable(idle_expiry_s=10, max_tombstones=2)
    for sid in ("a", "b", "c"):
        table.begin(sid, "main", msgs(("user", "q")), 0)
        table.close(sid)
    assert table.tombstones == 2                              # "a", the oldest, was evicted
    late = turn("a", 0)
    assert table.finish(late, 1) == [Dropped(late, "no_next_state")]  # still never recreated
    assert "a" not in table
    assert table.expire(now=5) == [] and table.tombstones == 2
    assert table.expire(now=10.5) == [] and table.tombstones == 0     # older than the expiry
    # A session id used again after its close is a new session; its request 0 of the closed
    # session never ended (its tombstone aged out), so the new session counts on from 1.
    i, _ = table.begin("b", "main", msgs(("user", "q")), 11)
    tb = turn("b", i)
    assert i == 1 and table.finish(tb, 11) == [] and "b" in table
    with pytest.raises(ValueError, match="max_tombstones = -1"):
        SessionTable(max_tombstones=-1)


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
    """One turn (turn() above, R = 3) judged on CORRECTION by a real JudgeLoop + Pusher."""
    async def main():
        stats, buf = emit.Stats(), ListBuffer()
        pusher = Pusher(buf, stats, linger_s=0).start()
        loop = judge_loop.JudgeLoop(judge=RuleJudgeClient(judge_fails), teacher=ScriptedTeacher(answer),
                              encode=lambda m, t: [1, 2, 3, 9], pusher=pusher, stats=stats,
                              method="combine", m=1, teacher_topk=topk)
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
