"""The `Environment` interface every agent environment implements, and its small helpers.

An episode is driven by a runner (`clawjax.rollout.runner`):

    obs = env.reset(task)                      # the first user message of the episode
    while True:
        action = <the assistant's reply to the conversation so far>
        obs, done, outcome_reward = env.step(action)
        if done: break                         # obs is the final next state (thanks / correction)
    env.close()

Invariants:
  - `reset(task)` starts a fresh episode (any previous one is discarded) and returns an
    `Observation` with role "user".
  - `step(action)` returns the next state of the assistant's turn: role "user" (a person's reply)
    or "tool" (a tool's output, whose text starts with "OK" or "ERROR").
  - `outcome_reward` is 0.0 on every step but the last; on the step that returns done=True it is
    the episode's verified outcome (1.0 solved, 0.0 not solved).
  - `step` after done, or before `reset`, raises `EnvError`; a bad task raises `EnvError` naming
    the field, the value and what was expected.

A task is a JSON-like mapping (it comes from `clawjax.rollout.tasks` or is built in code):
`{"env": "homework" | "toolcall" | "terminal", "task_id": str, ...env-specific fields}`.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from typing import Any, ClassVar, Mapping

from clawjax.error_text import shown_value

ROLES = ("user", "tool")


class EnvError(ValueError):
    """Bad input to an environment: names the field, the value and what was expected."""

    def __init__(self, env: str, field: str, value: Any, expected: str):
        self.env = env
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"{env} environment: {field} = {shown_value(value)}, expected {expected}")


@dataclasses.dataclass(frozen=True)
class Observation:
    """What the agent sees next: a message with `role` "user" or "tool" and its `text`."""

    role: str
    text: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"Observation.role = {self.role!r}, expected one of {ROLES}")
        if not isinstance(self.text, str):
            raise ValueError(f"Observation.text = {self.text!r}, expected a str")

    def as_message(self) -> dict[str, str]:
        """The OpenAI chat message this observation becomes: `{"role", "content"}`."""
        return {"role": self.role, "content": self.text}


class Environment(abc.ABC):
    """One episode at a time; see the module docstring for the contract."""

    name: ClassVar[str] = "environment"
    # True for general agents (SPEC §2): the runner marks their sessions `episode`, and the
    # proxy adds the verified outcome to every step's judged reward. False (a simulated user):
    # the judged reply is the whole signal.
    outcome_rewards: ClassVar[bool] = False

    @abc.abstractmethod
    def reset(self, task: Mapping[str, Any]) -> Observation:
        """Starts an episode for `task`; returns the first (user) observation."""

    @abc.abstractmethod
    def step(self, action: str) -> tuple[Observation, bool, float]:
        """Applies the assistant's reply; returns (next observation, done, outcome_reward)."""

    def close(self) -> None:
        """Releases what the episode holds (temporary directories, processes). Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EpisodeState:
    """Step bookkeeping shared by the environments: started / done / number of steps."""

    def __init__(self, env: str):
        self.env = env
        self.started = False
        self.done = False
        self.steps = 0

    def start(self) -> None:
        self.started, self.done, self.steps = True, False, 0

    def begin_step(self, action: Any) -> None:
        if not self.started:
            raise EnvError(self.env, "step", "before reset", "reset(task) first")
        if self.done:
            raise EnvError(self.env, "step", "after done", "reset(task) for a new episode")
        if not isinstance(action, str):
            raise EnvError(self.env, "action", action, "the assistant's reply as a str")
        self.steps += 1


# -- task field helpers: every check names the field, the value and what was expected ----------

def task_str(env: str, task: Mapping[str, Any], field: str, default: str | None = None) -> str:
    value = task.get(field, default)
    if not isinstance(value, str) or not value:
        raise EnvError(env, f"task[{field!r}]", value, "a non-empty str")
    return value


def task_int(env: str, task: Mapping[str, Any], field: str, default: int | None = None,
             lo: int | None = None, hi: int | None = None) -> int:
    value = task.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise EnvError(env, f"task[{field!r}]", value, "an int")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise EnvError(env, f"task[{field!r}]", value, f"an int in [{lo}, {hi}]")
    return value


def check_task(env: str, task: Any) -> Mapping[str, Any]:
    """A task must be a mapping whose optional "env" field names this environment."""
    if not isinstance(task, Mapping):
        raise EnvError(env, "task", task, "a mapping (dict) of task fields")
    named = task.get("env", env)
    if named != env:
        raise EnvError(env, "task['env']", named, f"{env!r} (this environment)")
    return task


_INT = re.compile(r"(?<![\d.])-?\d+(?![\d.]*\d)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def last_integer(text: str) -> int | None:
    """The last integer written in `text` ("so 12 - 5 = 7." → 7, "1,200 pens" → 1200), or None.
    A leading minus counts only directly before the digits ("-3" → -3, "5 - 3" → 3)."""
    found = _INT.findall(_THOUSANDS.sub("", text))
    return int(found[-1]) if found else None
