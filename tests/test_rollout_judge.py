"""Pure judge pieces: vote parsing, majority (m = 1, 3, 5, ties, invalid answers), hint
selection, the teacher context, the prompt layout, and the rule judge's rules and server."""

from __future__ import annotations

import asyncio
import collections
import itertools

import httpx
import pytest

from clawjax.rollout import judge, prompts, rule_judge


def reference_majority(votes):
    """Independent reference: count valid votes by hand; unique top count wins, else 0."""
    counts = collections.defaultdict(int)
    for v in votes:
        if v in (-1, 0, 1):
            counts[v] += 1
    if not counts:
        return 0
    top = max(counts.values())
    winners = [v for v, c in counts.items() if c == top]
    return winners[0] if len(winners) == 1 else 0


@pytest.mark.parametrize("text,want", [
    ("\\boxed{1}", 1), ("\\boxed{+1}", 1), ("\\boxed{0}", 0), ("\\boxed{-1}", -1),
    ("first \\boxed{1} then on reflection \\boxed{-1}", -1),
    ("\\boxed{ -1 }", -1), ("\\boxed{1} and a bad one \\boxed{2}", 1),
    ("\\boxed{2}", None), ("\\boxed{yes}", None), ("1", None), ("", None), (None, None),
    ("boxed{1}", None), ("\\boxed{-2}", None), ("\\boxed{10}", None),
])
def test_parse_vote_takes_the_last_valid_box(text, want):
    assert judge.parse_vote(text) == want


@pytest.mark.parametrize("m", [1, 3, 5])
def test_majority_matches_reference_over_every_vote_combination(m):
    for votes in itertools.product((1, 0, -1, None), repeat=m):
        assert judge.majority(list(votes)) == reference_majority(votes), votes


def test_majority_named_cases():
    assert judge.majority([1]) == 1 and judge.majority([-1]) == -1
    assert judge.majority([None, None, None]) == 0            # no valid vote
    assert judge.majority([1, -1, None]) == 0                  # tie for the top
    assert judge.majority([1, -1, 0]) == 0                     # three-way tie
    assert judge.majority([1, 1, -1, -1, 0]) == 0              # tie at 2
    assert judge.majority([1, 1, -1, None, None]) == 1         # invalid votes ignored
    assert judge.majority([-1, -1, -1, 1, 1]) == -1
    assert judge.majority([0, 0, 1]) == 0


def test_hint_selection_picks_the_longest_valid_hint_of_positive_votes():
    answers = [
        "\\boxed{1}\n[HINT_START]Use metres.[HINT_END]",                  # 11 chars: valid
        "\\boxed{1}[HINT_START]   short    [HINT_END]",                    # 5 stripped: no
        "\\boxed{-1}[HINT_START]A much longer hint from a negative vote.[HINT_END]",
        "[HINT_START]A long hint without any vote at all here.[HINT_END]",
        "\\boxed{1}[HINT_START]old[HINT_END] \\boxed{1}"
        "[HINT_START]  Always answer with the unit.  [HINT_END]",          # last pair wins
        "\\boxed{1} but no markers",
    ]
    parsed = [judge.parse_hint_answer(a) for a in answers]
    assert parsed[0] == (1, "Use metres.")
    assert parsed[4] == (1, "  Always answer with the unit.  ")
    assert judge.select_hint(parsed) == "Always answer with the unit."
    assert judge.select_hint(parsed[:2]) == "Use metres."
    assert judge.select_hint(parsed[1:4]) is None
    assert judge.select_hint([(1, "x" * 10)]) is None          # must be > 10 once stripped
    assert judge.select_hint([(1, "a" * 12), (1, "b" * 12)]) == "a" * 12   # tie: earliest
    assert judge.select_hint([]) is None


def test_teacher_messages_append_to_the_last_user_message_only():
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "second"},
            {"role": "tool", "content": "OK 4"}]
    out = judge.teacher_messages(msgs, "Be brief.")
    assert out[3]["content"] == "second\n\n[user's hint / instruction]\nBe brief."
    assert [m["content"] for i, m in enumerate(out) if i != 3] == \
        [m["content"] for i, m in enumerate(msgs) if i != 3]
    assert msgs[3]["content"] == "second"                      # input untouched
    with pytest.raises(ValueError, match="no user message"):
        judge.teacher_messages([{"role": "system", "content": "s"}], "hint text")


def test_prompts_round_trip_and_sanitise_markers():
    view = prompts.TurnView("What <<<is>>> 2+2?", "It is 4.\n<<<END>>>", "tool", "OK: 4")
    for build, kind in ((prompts.prm_messages, "prm"), (prompts.hint_messages, "hint")):
        got_kind, got = prompts.parse_judge_prompt(build(view))
        assert got_kind == kind
        assert (got.next_role, got.next_text) == ("tool", "OK: 4")
        assert "<<<" not in got.response and "It is 4." in got.response
    assert prompts.HINT_START in prompts.HINT_SYSTEM and prompts.HINT_END in prompts.HINT_SYSTEM
    assert "\\boxed{1}" in prompts.PRM_SYSTEM and "\\boxed{-1}" in prompts.PRM_SYSTEM
    assert prompts.parse_judge_prompt([{"role": "user", "content": "hello"}]) is None


@pytest.mark.parametrize("role,text,want", [
    ("user", "Thanks a lot!", 1), ("user", "GREAT job", 1), ("user", "Perfect.", 1),
    ("user", "Correct! Next one.", 1), ("tool", "OK 42", 1), ("tool", "  OK done", 1),
    ("user", "That is wrong.", -1), ("user", "Incorrect, sorry", -1),
    ("user", "This is not what I asked for", -1), ("user", "that's not right", -1),
    ("user", "Please redo it", -1), ("user", "Try again.", -1), ("tool", "ERROR: bad", -1),
    ("user", "Great, but that's wrong.", -1),                  # a correction wins
    ("user", "OK thanks", 1), ("user", "ERROR in your text", 0),  # prefixes only for tools
    ("tool", "ok 42", 0), ("user", "Correct", 0), ("user", "What about 3+3?", 0),
])
def test_rule_judge_prm_rules(role, text, want):
    assert rule_judge.prm_score(role, text) == want


def test_rule_judge_hint_rule():
    assert rule_judge.hint_of("That's wrong. Please give only the final number.\nThanks") == \
        "Please give only the final number."
    assert rule_judge.hint_of("No! Remember the units. Hint: metres! Always round.") == \
        "Remember the units. Hint: metres! Always round."
    assert rule_judge.hint_of("Next time, show your work.") == "Next time, show your work."
    assert rule_judge.hint_of("Please.") is None               # ≤ 10 characters
    assert rule_judge.hint_of("please lower-case openers do not count.") is None
    assert rule_judge.hint_of("Thanks, great.") is None


def test_rule_judge_answers_through_the_judge_code_path():
    view = prompts.TurnView("q", "a", "user", "Wrong! Please use whole numbers only.")
    app_answers = [rule_judge.answer(prompts.prm_messages(view)),
                   rule_judge.answer(prompts.hint_messages(view))]
    assert judge.parse_vote(app_answers[0]) == -1
    assert judge.parse_hint_answer(app_answers[1]) == (1, "Please use whole numbers only.")
    none = prompts.TurnView("q", "a", "user", "Thanks!")
    assert judge.parse_hint_answer(rule_judge.answer(prompts.hint_messages(none))) == (-1, None)
    assert rule_judge.answer([{"role": "user", "content": "hi"}]) == rule_judge.CHAT_REPLY


def test_rule_judge_server_and_async_voting():
    from test_rollout_proxy import AppThread
    from clawjax.serving.client import SGLangClient
    srv = AppThread(rule_judge.build_app())
    try:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = httpx.post(srv.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hello"}]})
        assert r.json()["choices"][0]["message"]["content"] == rule_judge.CHAT_REPLY
        view = prompts.TurnView("q", "a", "tool", "ERROR: division by zero. Hint: check b")

        async def main():
            async with SGLangClient(srv.url) as client:
                return await judge.judge_turn(client, view, m=5)
        out = asyncio.run(main())
        assert out.votes == [-1] * 5 and out.reward == -1
        assert out.hint_votes == [1] * 5 and out.hint == "Hint: check b"

        async def unreachable():
            async with SGLangClient("http://127.0.0.1:9", timeout=2) as client:
                return await judge.judge_turn(client, view, m=3)
        out = asyncio.run(unreachable())                       # failed calls: invalid votes
        assert out.votes == [None] * 3 and out.reward == 0 and out.hint is None
    finally:
        srv.stop()


def test_rollout_cli_judge_votes_follow_the_method():
    """`--prm-m` defaults to SPEC §7's PRM_M: 3 votes for Binary RL, 1 otherwise."""
    from clawjax.rollout.__main__ import parse_args

    base = ["serve", "--port", "8000", "--model-dir", "m", "--policy-url", "http://p:1",
            "--judge-url", "http://j:1", "--buffer", "127.0.0.1:1"]
    assert [parse_args(base + ["--method", m]).prm_m for m in ("rl", "opd", "combine")] \
        == [3, 1, 1]
    assert parse_args(base + ["--method", "rl", "--prm-m", "5"]).prm_m == 5
    with pytest.raises(SystemExit):
        parse_args(base + ["--prm-m", "0"])


def test_rollout_cli_teacher_topk_defaults_to_none_and_is_range_checked(capsys):
    from clawjax.rollout.__main__ import parse_args

    base = ["serve", "--port", "8000", "--model-dir", "m", "--policy-url", "http://p:1",
            "--judge-url", "http://j:1", "--buffer", "127.0.0.1:1"]
    assert parse_args(base).teacher_topk == 0
    assert parse_args(base + ["--teacher-topk", "50"]).teacher_topk == 50
    for bad in ("-1", "1025"):
        with pytest.raises(SystemExit):
            parse_args(base + ["--teacher-topk", bad])
        assert f"--teacher-topk = {bad}, expected 0 (none) to 1024" in capsys.readouterr().err


def test_rollout_cli_refuses_judge_sampling_no_judge_would_accept(capsys):
    """A negative / NaN `--judge-temperature` or a negative `--judge-max-tokens` made every
    judge call fail: every vote invalid, every reward 0. They are refused at start, naming the
    flag, the value and what is expected. `--judge-max-tokens 0` stays what it always meant:
    the judge's own limit, as if the flag were omitted."""
    from clawjax.rollout.__main__ import parse_args

    base = ["serve", "--port", "8000", "--model-dir", "m", "--policy-url", "http://p:1",
            "--judge-url", "http://j:1", "--buffer", "127.0.0.1:1"]
    args = parse_args(base + ["--judge-temperature", "0", "--judge-max-tokens", "1"])
    assert (args.judge_temperature, args.judge_max_tokens) == (0.0, 1)
    assert parse_args(base).judge_max_tokens is None
    assert parse_args(base + ["--judge-max-tokens", "0"]).judge_max_tokens == 0
    for flag, bad in (("--judge-temperature", "-0.5"), ("--judge-temperature", "nan"),
                      ("--judge-temperature", "inf"), ("--judge-max-tokens", "-3")):
        with pytest.raises(SystemExit):
            parse_args(base + [flag, bad])
        err = capsys.readouterr().err
        assert f"{flag} = {float(bad) if 'temperature' in flag else bad}" in err, err
        assert "expected" in err, err
