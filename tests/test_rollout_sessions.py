"""The session state machine (pure): next states, turns, single-turn and idle sessions,
requests in flight, episodes, and a session closed while one of its turns is generating."""

from __future__ import annotations

import dataclasses

import pytest

from clawjax.rollout import sessions
from clawjax.rollout.sessions import (Dropped, EpisodeEnd, JudgeJob, LoneTurn, NextState,
                                      SessionTable)
from rollout_turns import msgs, turn


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


@pytest.mark.parametrize("role", ["system", "developer"])
def test_a_system_message_before_the_reply_is_skipped_not_the_next_state(role):
    """SPEC §8: the user's reply (or the tool output) is the next state of the turn before it,
    also when the agent put a system/developer message (a reminder, injected context) between
    that turn's answer and the reply; the instruction itself is not part of the next state."""
    note = (role, "Reminder: be brief.")
    assert sessions.next_state_of(msgs(("user", "q"), ("assistant", "a"), note,
                                       ("user", "thx"))) == NextState("user", "thx")
    assert sessions.next_state_of(msgs(("user", "q"), ("assistant", "call"), ("tool", "OK 1"),
                                       note, ("tool", "OK 2"))) == NextState("tool", "OK 1\nOK 2")
    # Unchanged: messages that end otherwise, or hold no assistant message, carry none.
    assert sessions.next_state_of(msgs(("assistant", "a"), ("user", "thx"), note)) is None
    assert sessions.next_state_of(msgs(("assistant", "a"), note)) is None
    assert sessions.next_state_of(msgs(note, ("user", "q"))) is None
    table = SessionTable(idle_expiry_s=10)
    table.begin("s", "main", msgs(("user", "q")), 0)
    t0 = turn(index=0)
    table.finish(t0, 1)
    _, ev = table.begin("s", "main", msgs(("user", "q"), ("assistant", "a"), note,
                                          ("user", "Thanks!")), 2)
    assert ev == [JudgeJob(t0, NextState("user", "Thanks!"))]


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
