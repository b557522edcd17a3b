"""A simulated student with arithmetic homework (the paper's GSM8K student, kept tiny).

The user asks one problem, generated from a seed (small integers; +, -, *; one- and two-step
word problems), reads the assistant's reply, and checks the LAST integer in it exactly. A wrong
number gets a correction phrased as a person would ("That's wrong, 7 + 5 is not 13. Please
double-check the addition."); a right one gets thanks. The vocabulary is deliberately small
(digits and well under a hundred distinct words) so a tiny character-level model can learn it.

Hidden preference (optional, task field "preference"): how the user wants the answer written.
The first message never states it; it is revealed only in a correction, as a sentence starting
"Please ..." that the rule judge turns into the hint:
  - "final_only": the reply must be just the number ("7" or "7."), nothing else.
  - "explain": the reply must show its working as an equation ("12 - 5 = 7") before the number.
A right number in the wrong form is a correction too (reward -1, hint = the preference).

Rule-judge contract (`clawjax.rollout.rule_judge`, case-insensitive keywords):
  THANKS contains "thank" and "correct!"  → +1;  every correction contains "wrong",
  "incorrect", "try again" or "not what I asked" → -1, and carries one "Please ..." sentence.

Task fields: {"env": "homework", "task_id": str, "seed": int} or, instead of "seed", an explicit
{"question": str, "answer": int}; optional "preference" (None | "final_only" | "explain") and
"max_attempts" (int in [1, 10], default 3). Outcome reward at the end: 1.0 if the user was
satisfied (right number in the preferred form), else 0.0 once the attempts run out.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, Mapping

from clawjax.rollout.envs.base import (EnvError, Environment, EpisodeState, Observation,
                                       check_task, last_integer, task_int, task_str)

PREFERENCES = (None, "final_only", "explain")

OPENER = "Can you help me with my homework?"
THANKS = "Thanks, that is correct!"
# The corrections. Every one holds a negative keyword and exactly one "Please ..." sentence.
WRONG = "That's wrong, {expression} is not {given}. Please double-check the {operation}."
WRONG_WORD = "That's wrong, {given} is not the answer. Please work through it step by step."
NO_NUMBER = "That's not what I asked. Please end your answer with the final number."
HINT_FINAL_ONLY = "Please give only the final number."
HINT_EXPLAIN = "Please show the working as an equation before the final number."
PREFERENCE_MISS = "The number is right, but that is not what I asked. {hint}"
PREFERENCE_HINTS = {"final_only": HINT_FINAL_ONLY, "explain": HINT_EXPLAIN}

OPERATIONS = {"+": "addition", "-": "subtraction", "*": "multiplication"}
NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Lily")
THINGS = ("apples", "pens", "books", "cards", "cookies", "stickers")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One homework problem. `expression` is the arithmetic it needs ("7 + 5", "3 * 4 - 2");
    `operation` names the last operation ("addition") for corrections; empty for word problems,
    whose corrections do not repeat the arithmetic."""

    question: str
    answer: int
    expression: str
    operation: str = ""
    word_problem: bool = False


def make_problem(seed: int) -> Problem:
    """The problem of a seed: deterministic, small non-negative integers, answers < 200."""
    rng = random.Random(seed)
    kind = rng.randrange(7)
    name, other = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    if kind == 0:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        return _symbolic(a, "+", b, a + b)
    if kind == 1:
        a = rng.randint(5, 30)
        b = rng.randint(1, a - 1)
        return _symbolic(a, "-", b, a - b)
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return _symbolic(a, "*", b, a * b)
    if kind == 3:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        q = f"{name} has {a} {thing}. {other} gives {name} {b} more. How many {thing} does {name} have now?"
        return Problem(q, a + b, f"{a} + {b}", word_problem=True)
    if kind == 4:
        a = rng.randint(5, 30)
        b = rng.randint(1, a - 1)
        q = f"{name} has {a} {thing} and gives {b} to {other}. How many {thing} does {name} have left?"
        return Problem(q, a - b, f"{a} - {b}", word_problem=True)
    if kind == 5:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(1, a * b - 1)
        q = (f"A box holds {a} {thing}. {name} buys {b} boxes and then gives {c} {thing} to "
             f"{other}. How many {thing} does {name} have now?")
        return Problem(q, a * b - c, f"{a} * {b} - {c}", word_problem=True)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    q = (f"{name} had {a} {thing}, found {b} more and then lost {c}. "
         f"How many {thing} does {name} have now?")
    return Problem(q, a + b - c, f"{a} + {b} - {c}", word_problem=True)


def _symbolic(a: int, op: str, b: int, answer: int) -> Problem:
    expression = f"{a} {op} {b}"
    return Problem(f"What is {expression}?", answer, expression, OPERATIONS[op])


def homework_tasks(n: int, seed: int = 0, preference: str | None = None,
                   prefix: str = "hw") -> list[dict[str, Any]]:
    """`n` task dicts with seeds seed, seed+1, ... (e.g. to write a JSONL task file)."""
    if preference not in PREFERENCES:
        raise EnvError("homework", "preference", preference, f"one of {PREFERENCES}")
    tasks = []
    for i in range(n):
        task: dict[str, Any] = {"env": "homework", "task_id": f"{prefix}-{seed + i}", "seed": seed + i}
        if preference is not None:
            task["preference"] = preference
        tasks.append(task)
    return tasks


_FINAL_ONLY = re.compile(r"\s*-?\d+\s*\.?\s*")


def satisfies_preference(reply: str, preference: str | None) -> bool:
    """Whether a reply (whose last integer is already right) has the form the user wants."""
    if preference is None:
        return True
    if preference == "final_only":
        return _FINAL_ONLY.fullmatch(reply) is not None
    # "explain": an equation sign before the final number.
    numbers = list(re.finditer(r"\d+", reply))
    return bool(numbers) and "=" in reply[:numbers[-1].start()]


def problem_of(task: Mapping[str, Any]) -> Problem:
    """The task's problem: generated from "seed", or the explicit "question" and "answer"."""
    if "seed" in task:
        return make_problem(task_int("homework", task, "seed"))
    question = task_str("homework", task, "question")
    answer = task_int("homework", task, "answer")
    return Problem(question, answer, "", word_problem=True)


class HomeworkEnv(Environment):
    """The simulated student. See the module docstring for the task fields and phrases."""

    name = "homework"

    def __init__(self):
        self._state = EpisodeState(self.name)
        self.problem: Problem | None = None
        self.preference: str | None = None
        self.max_attempts = 3
        self.solved = False

    def reset(self, task: Mapping[str, Any]) -> Observation:
        task = check_task(self.name, task)
        if "seed" not in task and "question" not in task:
            raise EnvError(self.name, "task", dict(task), "a 'seed' or a 'question' and 'answer'")
        preference = task.get("preference")
        if preference not in PREFERENCES:
            raise EnvError(self.name, "task['preference']", preference, f"one of {PREFERENCES}")
        self.problem = problem_of(task)
        self.preference = preference
        self.max_attempts = task_int(self.name, task, "max_attempts", 3, lo=1, hi=10)
        self.solved = False
        self._state.start()
        return Observation("user", f"{OPENER} {self.problem.question}")

    def step(self, action: str) -> tuple[Observation, bool, float]:
        self._state.begin_step(action)
        problem = self.problem
        given = last_integer(action)
        if given is None:
            text = NO_NUMBER
        elif given != problem.answer:
            if problem.word_problem or not problem.operation:
                text = WRONG_WORD.format(given=given)
            else:
                text = WRONG.format(expression=problem.expression, given=given,
                                    operation=problem.operation)
        elif not satisfies_preference(action, self.preference):
            text = PREFERENCE_MISS.format(hint=PREFERENCE_HINTS[self.preference])
        else:
            self.solved = True
            self._state.done = True
            return Observation("user", THANKS), True, 1.0
        self._state.done = self._state.steps >= self.max_attempts
        return Observation("user", text), self._state.done, 0.0
