"""A tool-call environment: a calculator, a small lookup table of facts, and a verified answer.

The agent speaks a plain text syntax (the first message states it). The FIRST line of a reply
that is a directive counts; other lines are free text:

    CALL calculator: 3 * (4 + 5)      → tool output "OK 27"
    CALL lookup: hours in a day       → tool output "OK 24"
    ANSWER: 72                        → the episode ends; the answer is verified

Tool outputs have role "tool" and start with "OK" or "ERROR" (the rule judge scores them +1 / -1).
The final answer gets a user reply: CORRECT ("Correct! Thanks.", +1) or a correction with a
"Please ..." hint (-1). A reply with no directive gets a correction and the episode goes on.

Task fields: {"env": "toolcall", "task_id": str, "question": str, "answer": str | int | float}
plus optional "facts" (a dict str → str added to the lookup table) and "max_steps" (default 6).
Outcome reward: 1.0 when the ANSWER matches (numbers within 1e-6 relative, text case-folded),
0.0 for a wrong answer or when max_steps replies pass without one.
"""

from __future__ import annotations

import ast
import math
import operator
import random
import re
from typing import Any, Mapping

from clawjax.rollout.envs.base import (EnvError, Environment, EpisodeState, Observation,
                                       check_task, task_int, task_str)

INSTRUCTIONS = ("You can use two tools: calculator (arithmetic) and lookup (facts). To use one, "
                "reply with a line like CALL calculator: 6 * 7 or CALL lookup: hours in a day. "
                "To finish, reply with a line like ANSWER: 42.")
CORRECT = "Correct! Thanks."
WRONG_ANSWER = "That's wrong, {given} is not the answer. Please look up the facts you need before you calculate."
NO_DIRECTIVE = "That's not what I asked. Please reply with a CALL line or an ANSWER line."

FACTS: dict[str, str] = {
    "hours in a day": "24", "days in a week": "7", "minutes in an hour": "60",
    "seconds in a minute": "60", "months in a year": "12", "days in a year": "365",
    "legs of a spider": "8", "legs of a dog": "4", "wheels on a bike": "2",
    "sides of a triangle": "3", "sides of a square": "4", "eggs in a dozen": "12",
    "capital of france": "Paris", "capital of japan": "Tokyo",
    "boiling point of water in celsius": "100", "freezing point of water in celsius": "0",
}

_DIRECTIVE = re.compile(r"^\s*(?:CALL\s+(\w+)\s*:\s*(.*?)|ANSWER\s*:\s*(.*?))\s*$",
                        re.IGNORECASE | re.MULTILINE)

MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 1e12
MAX_EXPONENT = 12

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    pass


def calculate(expression: str) -> int | float:
    """Evaluates + - * / // % ** and parentheses over int/float literals (no names, no calls).
    Raises CalculatorError for anything else, division by zero, |exponent| > 12 or a result
    beyond 1e12 in magnitude."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*"), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError(f"cannot parse {expression!r}") from None
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {right} is larger than {MAX_EXPONENT}")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except (OverflowError, ValueError) as e:  # e.g. a negative number to a fractional power
            raise CalculatorError(str(e)) from None
    else:
        raise CalculatorError(f"{type(node).__name__} is not allowed; use numbers and + - * / ( )")
    if isinstance(value, complex) or not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise CalculatorError(f"result {value} is out of range (|x| <= {MAX_MAGNITUDE:g})")
    return value


def format_number(value: int | float) -> str:
    """Integers (and integral floats) without a decimal point, others to 6 decimal places."""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def normalize_key(text: str) -> str:
    """A lookup key as stored: lowercase, single spaces, no "the " prefix or trailing "?"/"."."""
    key = " ".join(text.lower().split()).rstrip("?.").strip()
    return key[4:] if key.startswith("the ") else key


def answers_match(given: str, expected: Any) -> bool:
    """The verifier: numbers within 1e-6 relative (at least 1e-6 absolute), text case-folded."""
    given = given.strip().rstrip(".").strip()
    try:
        g, e = float(given.replace(",", "")), float(str(expected))
    except ValueError:
        return given.casefold() == str(expected).strip().casefold()
    return abs(g - e) <= 1e-6 * max(1.0, abs(e))


_TEMPLATES = (
    ("How many hours are in {n} days?", "hours in a day", 24),
    ("How many legs do {n} spiders have?", "legs of a spider", 8),
    ("How many minutes are in {n} hours?", "minutes in an hour", 60),
    ("How many eggs are in {n} dozen?", "eggs in a dozen", 12),
    ("How many days are in {n} weeks?", "days in a week", 7),
)


def make_task(seed: int, prefix: str = "tool") -> dict[str, Any]:
    """A question that needs one lookup and one multiplication, e.g. hours in 3 days → 72."""
    rng = random.Random(seed)
    question, _, per = rng.choice(_TEMPLATES)
    n = rng.randint(2, 9)
    return {"env": "toolcall", "task_id": f"{prefix}-{seed}",
            "question": question.format(n=n), "answer": per * n}


class ToolCallEnv(Environment):
    """Calculator + lookup; see the module docstring for the syntax and the task fields."""

    name = "toolcall"
    outcome_rewards = True

    def __init__(self):
        self._state = EpisodeState(self.name)
        self.facts: dict[str, str] = {}
        self.expected: Any = None
        self.max_steps = 6
        self.tool_calls = 0

    def reset(self, task: Mapping[str, Any]) -> Observation:
        task = check_task(self.name, task)
        question = task_str(self.name, task, "question")
        expected = task.get("answer")
        if isinstance(expected, bool) or not isinstance(expected, (str, int, float)) or expected == "":
            raise EnvError(self.name, "task['answer']", expected, "a non-empty str or a number")
        extra = task.get("facts", {})
        if not isinstance(extra, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise EnvError(self.name, "task['facts']", extra, "a dict of str → str")
        self.facts = dict(FACTS)
        self.facts.update({normalize_key(k): v for k, v in extra.items()})
        self.expected = expected
        self.max_steps = task_int(self.name, task, "max_steps", 6, lo=1, hi=50)
        self.tool_calls = 0
        self._state.start()
        return Observation("user", f"{INSTRUCTIONS} {question}")

    def step(self, action: str) -> tuple[Observation, bool, float]:
        self._state.begin_step(action)
        match = _DIRECTIVE.search(action)
        if match is not None and match.group(3) is not None:
            self._state.done = True
            given = match.group(3)
            if answers_match(given, self.expected):
                return Observation("user", CORRECT), True, 1.0
            return Observation("user", WRONG_ANSWER.format(given=given.strip() or "nothing")), True, 0.0
        if match is None:
            observation = Observation("user", NO_DIRECTIVE)
        else:
            self.tool_calls += 1
            observation = Observation("tool", self.call(match.group(1), match.group(2)))
        self._state.done = self._state.steps >= self.max_steps
        return observation, self._state.done, 0.0

    def call(self, tool: str, argument: str) -> str:
        """One tool call's output: "OK <result>" or "ERROR <tool>: <why>"."""
        tool = tool.lower()
        if tool == "calculator":
            try:
                return f"OK {format_number(calculate(argument))}"
            except CalculatorError as e:
                return f"ERROR calculator: {e}"
        if tool == "lookup":
            key = normalize_key(argument)
            if key in self.facts:
                return f"OK {self.facts[key]}"
            return f"ERROR lookup: no fact named {argument.strip()!r}; known: {', '.join(sorted(self.facts))}"
        return f"ERROR unknown tool {tool!r}; the tools are calculator and lookup"
