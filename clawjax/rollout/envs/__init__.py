"""Agent environments driven through the proxy by `clawjax.rollout.runner`.

    from clawjax.rollout.envs import make_env, env_for_task
    env = make_env("homework")            # or env_for_task({"env": "terminal", ...})
    obs = env.reset(task); obs, done, outcome = env.step(reply)

Three ship here: `homework` (a simulated student; hidden answer-form preference), `toolcall`
(calculator + lookup with a verified answer), `terminal` (sandboxed commands, file checks).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from clawjax.rollout.envs.base import EnvError, Environment, Observation
from clawjax.rollout.envs.homework import HomeworkEnv
from clawjax.rollout.envs.terminal import TerminalEnv
from clawjax.rollout.envs.toolcall import ToolCallEnv

ENVIRONMENTS: dict[str, Callable[..., Environment]] = {
    HomeworkEnv.name: HomeworkEnv,
    ToolCallEnv.name: ToolCallEnv,
    TerminalEnv.name: TerminalEnv,
}


def make_env(name: str, **kwargs: Any) -> Environment:
    """A new environment by name ("homework", "toolcall", "terminal"); kwargs go to its class."""
    if name not in ENVIRONMENTS:
        raise EnvError("rollout", "env", name, f"one of {sorted(ENVIRONMENTS)}")
    return ENVIRONMENTS[name](**kwargs)


def env_for_task(task: Mapping[str, Any], **kwargs: Any) -> Environment:
    """A new environment of the kind the task names in its "env" field."""
    if not isinstance(task, Mapping):
        raise EnvError("rollout", "task", task, "a mapping with an 'env' field")
    return make_env(task.get("env"), **kwargs)


__all__ = ["ENVIRONMENTS", "EnvError", "Environment", "HomeworkEnv", "Observation", "TerminalEnv",
           "ToolCallEnv", "env_for_task", "make_env"]
