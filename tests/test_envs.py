"""Homework and tool-call environments: scripted episodes reach `done` with the right outcome,
corrections carry the rule judge's keywords and hints, bad tasks are named."""

import re

import pytest

from clawjax.rollout.envs import (EnvError, HomeworkEnv, Observation, ToolCallEnv, env_for_task,
                                  make_env)
from clawjax.rollout.envs import homework, terminal, toolcall
from clawjax.rollout.envs.base import last_integer

# The rule judge's keyword contract (clawjax.rollout.rule_judge), restated independently.
POSITIVE = ("thank", "great", "perfect", "correct!")
NEGATIVE = ("wrong", "incorrect", "not what i asked", "that's not right", "please redo", "try again")
HINT_STARTS = ("Please", "Remember", "Always", "Next time", "Hint:")


def judged(obs: Observation) -> int:
    text = obs.text.lower()
    if obs.role == "tool" and obs.text.startswith("ERROR") or any(k in text for k in NEGATIVE):
        assert not any(k in text for k in POSITIVE), obs.text
        return -1
    if obs.role == "tool" and obs.text.startswith("OK") or any(k in text for k in POSITIVE):
        return 1
    return 0


def hints(text: str) -> list[str]:
    sentences = re.split(r"(?<=[.!?])\s+", text)
    return [s for s in sentences if s.startswith(HINT_STARTS) and len(s.strip()) > 10]


def reference_answer(question: str) -> int:
    """Solves a generated problem from its text alone (independent of the generator)."""
    m = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", question)
    if m:
        a, op, b = int(m[1]), m[2], int(m[3])
        return {"+": a + b, "-": a - b, "*": a * b}[op]
    n = [int(x) for x in re.findall(r"\d+", question)]
    if "box holds" in question:
        return n[0] * n[1] - n[2]
    if "found" in question:
        return n[0] + n[1] - n[2]
    if "more" in question:
        return n[0] + n[1]
    return n[0] - n[1]


def test_problems_are_deterministic_small_and_solvable():
    words = set()
    for seed in range(300):
        p = homework.make_problem(seed)
        assert p == homework.make_problem(seed)
        assert p.answer == reference_answer(p.question), p
        assert 0 < p.answer < 200
        words |= set(re.findall(r"[A-Za-z']+", p.question))
    assert len(words) < 100
    assert len({homework.make_problem(s).question for s in range(300)}) > 200


def test_homework_right_answer_gets_thanks():
    env = HomeworkEnv()
    obs = env.reset({"env": "homework", "task_id": "a", "seed": 7})
    problem = homework.make_problem(7)
    assert obs == Observation("user", f"{homework.OPENER} {problem.question}")
    obs, done, outcome = env.step(f"Let me see. The answer is {problem.answer}.")
    assert (obs.text, done, outcome) == (homework.THANKS, True, 1.0)
    assert judged(obs) == 1
    with pytest.raises(EnvError, match="after done"):
        env.step("again")


def test_homework_wrong_then_right_with_user_phrased_correction():
    env = HomeworkEnv()
    env.reset({"task_id": "b", "question": "What is 7 + 5?", "answer": 12})
    obs, done, outcome = env.step("7 + 5 = 13")
    assert not done and outcome == 0.0 and judged(obs) == -1
    assert "13" in obs.text and hints(obs.text)
    obs, done, outcome = env.step("Sorry: 7 + 5 = 12")
    assert done and outcome == 1.0 and judged(obs) == 1


def test_homework_symbolic_correction_names_the_operation():
    seed = next(s for s in range(100) if homework.make_problem(s).operation == "addition")
    p = homework.make_problem(seed)
    env = HomeworkEnv()
    env.reset({"task_id": "c", "seed": seed})
    obs, _, _ = env.step(str(p.answer + 1))
    assert obs.text == (f"That's wrong, {p.expression} is not {p.answer + 1}. "
                        "Please double-check the addition.")
    assert hints(obs.text) == ["Please double-check the addition."]


def test_homework_runs_out_of_attempts_with_outcome_zero():
    env = HomeworkEnv()
    env.reset({"task_id": "d", "seed": 3, "max_attempts": 2})
    obs, done, outcome = env.step("I do not know")
    assert not done and judged(obs) == -1 and hints(obs.text)
    obs, done, outcome = env.step("-1")
    assert done and outcome == 0.0 and judged(obs) == -1


@pytest.mark.parametrize("preference, wrong_form, right_form, hint", [
    ("final_only", "{a} + 0 = {a}, so the answer is {a}", "{a}", homework.HINT_FINAL_ONLY),
    ("explain", "{a}", "We add: {e} = {a}", homework.HINT_EXPLAIN),
])
def test_homework_hidden_preference_is_revealed_only_in_corrections(preference, wrong_form, right_form, hint):
    seed = next(s for s in range(100) if homework.make_problem(s).operation == "addition")
    p = homework.make_problem(seed)
    env = HomeworkEnv()
    first = env.reset({"task_id": "e", "seed": seed, "preference": preference})
    assert hint not in first.text and "only" not in first.text and "equation" not in first.text
    obs, done, _ = env.step(wrong_form.format(a=p.answer, e=p.expression))
    assert not done and judged(obs) == -1
    assert hints(obs.text) == [hint]
    obs, done, outcome = env.step(right_form.format(a=p.answer, e=p.expression))
    assert (done, outcome, judged(obs)) == (True, 1.0, 1)


def test_homework_preference_forms():
    assert homework.satisfies_preference(" 12. ", "final_only")
    assert not homework.satisfies_preference("It is 12", "final_only")
    assert homework.satisfies_preference("7 + 5 = 12", "explain")
    assert not homework.satisfies_preference("The answer is 12", "explain")
    assert homework.satisfies_preference("anything 12", None)
    assert not homework.satisfies_preference("no number =", "explain")
    assert homework.satisfies_preference("5 - 7 = -2", "explain")


def test_homework_task_generator_and_bad_tasks():
    tasks = homework.homework_tasks(3, seed=10, preference="explain")
    assert [t["task_id"] for t in tasks] == ["hw-10", "hw-11", "hw-12"]
    assert all(t["preference"] == "explain" and t["env"] == "homework" for t in tasks)
    env = HomeworkEnv()
    with pytest.raises(EnvError, match=r"task\['preference'\] = 'terse'"):
        env.reset({"task_id": "x", "seed": 1, "preference": "terse"})
    with pytest.raises(EnvError, match=r"task\['seed'\] = '1', expected an int"):
        env.reset({"task_id": "x", "seed": "1"})
    with pytest.raises(EnvError, match="'seed' or a 'question'"):
        env.reset({"task_id": "x"})
    with pytest.raises(EnvError, match=r"task\['env'\] = 'terminal'"):
        env.reset({"env": "terminal", "task_id": "x", "seed": 1})
    with pytest.raises(EnvError, match="before reset"):
        HomeworkEnv().step("12")
    with pytest.raises(EnvError, match="max_attempts"):
        env.reset({"task_id": "x", "seed": 1, "max_attempts": 0})


def test_last_integer():
    assert last_integer("so 12 - 5 = 7.") == 7
    assert last_integer("1,200 pens") == 1200
    assert last_integer("it is -3") == -3
    assert last_integer("5 - 3") == 3
    assert last_integer("3.5") is None
    assert last_integer("none") is None


def test_toolcall_scripted_episode_reaches_verified_answer():
    env = ToolCallEnv()
    first = env.reset({"env": "toolcall", "task_id": "t", "question": "How many hours are in 3 days?",
                       "answer": 72})
    assert first.role == "user" and "CALL calculator:" in first.text and "ANSWER:" in first.text
    obs, done, _ = env.step("I need a fact.\nCALL lookup: the hours in a day?")
    assert obs == Observation("tool", "OK 24") and not done and judged(obs) == 1
    obs, done, _ = env.step("CALL calculator: 24 * 3")
    assert obs == Observation("tool", "OK 72") and not done
    obs, done, outcome = env.step("ANSWER: 72")
    assert (obs.text, done, outcome, judged(obs)) == (toolcall.CORRECT, True, 1.0, 1)


def test_toolcall_wrong_answer_and_errors():
    env = ToolCallEnv()
    env.reset({"task_id": "t", "question": "Capital of Japan?", "answer": "Tokyo", "max_steps": 4})
    obs, done, _ = env.step("CALL lookup: capital of Mars")
    assert obs.role == "tool" and obs.text.startswith("ERROR lookup") and judged(obs) == -1
    obs, _, _ = env.step("CALL search: tokyo")
    assert obs.text.startswith("ERROR unknown tool 'search'")
    obs, done, _ = env.step("I think it is Tokyo")
    assert obs.role == "user" and judged(obs) == -1 and hints(obs.text) and not done
    obs, done, outcome = env.step("ANSWER: Kyoto")
    assert done and outcome == 0.0 and judged(obs) == -1 and hints(obs.text)

    env.reset({"task_id": "t", "question": "Capital of Japan?", "answer": "Tokyo"})
    assert env.step("answer: tokyo.")[1:] == (True, 1.0)


def test_toolcall_max_steps_ends_with_outcome_zero():
    env = ToolCallEnv()
    env.reset({"task_id": "t", "question": "q", "answer": 1, "max_steps": 2})
    assert env.step("CALL calculator: 1")[1] is False
    obs, done, outcome = env.step("CALL calculator: 1")
    assert (obs.text, done, outcome) == ("OK 1", True, 0.0)


@pytest.mark.parametrize("expression, expected", [
    ("2 + 3 * 4", "14"), ("(2 + 3) * 4", "20"), ("7 / 2", "3.5"), ("2 ^ 10", "1024"),
    ("-3 + 1", "-2"), ("10 // 3", "3"), ("10 % 3", "1"), ("1 / 3", "0.333333"), ("6 × 7", "42"),
])
def test_calculator_against_python(expression, expected):
    assert toolcall.format_number(toolcall.calculate(expression)) == expected


@pytest.mark.parametrize("expression, reason", [
    ("__import__('os').system('true')", "not allowed"), ("1 / 0", "division by zero"),
    ("2 ** 100", "exponent"), ("10 ** 12 * 10", "out of range"), ("1 +", "cannot parse"),
    ("x + 1", "not allowed"), ("(" * 300, "longer than"), ("'a' * 3", "not allowed"),
])
def test_calculator_rejects(expression, reason):
    with pytest.raises(toolcall.CalculatorError, match=reason):
        toolcall.calculate(expression)


def test_toolcall_generated_tasks_are_solvable_with_the_tools():
    for seed in range(20):
        task = toolcall.make_task(seed)
        env = ToolCallEnv()
        env.reset(task)
        n = int(re.search(r"\d+", task["question"])[0])
        key = next(k for q, k, _ in toolcall._TEMPLATES if q.format(n=n) == task["question"])
        per = env.step(f"CALL lookup: {key}")[0].text.removeprefix("OK ")
        product = env.step(f"CALL calculator: {per} * {n}")[0].text.removeprefix("OK ")
        assert env.step(f"ANSWER: {product}")[1:] == (True, 1.0)


def test_toolcall_bad_tasks():
    env = ToolCallEnv()
    with pytest.raises(EnvError, match=r"task\['answer'\] = None"):
        env.reset({"task_id": "t", "question": "q"})
    with pytest.raises(EnvError, match=r"task\['facts'\]"):
        env.reset({"task_id": "t", "question": "q", "answer": 1, "facts": {"a": 1}})
    env.reset({"task_id": "t", "question": "q", "answer": 1, "facts": {"The Moon Color": "grey"}})
    assert env.step("CALL lookup: moon color")[0].text == "OK grey"


def test_registry():
    assert isinstance(make_env("homework"), HomeworkEnv)
    assert isinstance(env_for_task({"env": "toolcall"}), ToolCallEnv)
    with pytest.raises(EnvError, match="env = 'gui'"):
        make_env("gui")
    with pytest.raises(ValueError, match="role"):
        Observation("assistant", "x")


def test_phrases_match_the_rule_judge():
    """The environments' replies score as intended under the real rule judge."""
    from clawjax.rollout import rule_judge

    cases = [  # (role, text, score, hint)
        ("user", homework.THANKS, 1, None),
        ("user", homework.WRONG.format(expression="7 + 5", given=13, operation="addition"), -1,
         "Please double-check the addition."),
        ("user", homework.WRONG_WORD.format(given=3), -1, "Please work through it step by step."),
        ("user", homework.NO_NUMBER, -1, "Please end your answer with the final number."),
        ("user", homework.PREFERENCE_MISS.format(hint=homework.HINT_FINAL_ONLY), -1,
         homework.HINT_FINAL_ONLY),
        ("user", homework.PREFERENCE_MISS.format(hint=homework.HINT_EXPLAIN), -1,
         homework.HINT_EXPLAIN),
        ("user", toolcall.CORRECT, 1, None),
        ("user", toolcall.WRONG_ANSWER.format(given="5"), -1,
         "Please look up the facts you need before you calculate."),
        ("user", toolcall.NO_DIRECTIVE, -1, "Please reply with a CALL line or an ANSWER line."),
        ("tool", "OK 24", 1, None),
        ("tool", "ERROR calculator: division by zero", -1, None),
        ("user", terminal.PERFECT, 1, None),
        ("user", terminal.NOT_DONE.format(reason="there is no file a.txt"), -1,
         "Please check the result before you reply DONE."),
    ]
    for role, text, score, hint in cases:
        assert rule_judge.prm_score(role, text) == score, text
        assert rule_judge.hint_of(text) == hint, text
        assert judged(Observation(role, text)) == score
