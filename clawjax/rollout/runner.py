"""Drives N environments concurrently through an OpenAI-compatible `/v1/chat/completions`
(the rollout proxy, or any server speaking the API), with asyncio and httpx.

One episode = one session:

    messages = [system?] + [env.reset(task)]                    (role "user")
    loop:  POST {model, messages, session_id, turn_type: "main", ...sampling}
               headers X-Session-Id, X-Turn-Type: main
           reply → messages; env.step(reply) → observation, done, outcome
           observation → messages (role "user" or "tool")        the reply's next state
           until done or max_turns replies
    close: POST the whole transcript (ending in the last observation, the next state of the
           last turn) with session_done: true, X-Session-Done: true, outcome_reward (body) /
           X-Outcome-Reward (header) and max_tokens 0 (no sampling fields): the proxy's
           close-only form, which generates nothing and adds no turn. Any 200 answer (the
           proxy's `{"object": "session.done"}`, or a chat completion) counts as closed.

So the proxy sees every main-line turn's next state, including the last one's, learns the
episode's outcome when the session closes, and counts no spurious last turn (`no_next_state`).
A server without sessions that refuses `max_tokens: 0` fails only the close (recorded in
`EpisodeResult.error`); pass `close_session=False` for such servers.

Rewards (SPEC §2, general agents): the step total is r_outcome + r_process(step). For an
environment with `outcome_rewards` (tool-call, terminal) every call also says `episode: true` /
`X-Episode: true`, so the proxy holds the episode's judged turns until the close and trains each
on that sum (`clawjax.rollout.emit`); `step_reward_totals` is the same sum over a finished
episode's judged rewards, for callers outside the proxy.

From the command line (tasks from `clawjax.rollout.tasks`, results appended as JSONL):
    python -m clawjax.rollout.runner --url http://127.0.0.1:8000 --tasks tasks.jsonl \
        --episodes 64 --concurrency 16 --out episodes.jsonl --state tasks.state

Errors never stop other episodes: an HTTP error, a malformed response or an environment error
ends that episode with `EpisodeResult.error` set (and the session is still closed, best effort).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import os
import ssl
import sys
import uuid
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import httpx

from clawjax.rollout.envs.base import Environment, Observation


def step_reward_totals(step_rewards: Sequence[float], outcome_reward: float) -> list[float]:
    """Per-step totals of one episode, SPEC §2: total[i] = outcome_reward + step_rewards[i].

    `step_rewards` [S]: the judge's process reward of each main-line step, in order;
    `outcome_reward`: the episode's verified outcome. Returns [S] floats. Non-finite or
    non-numeric values raise ValueError naming the field and index."""
    if isinstance(outcome_reward, bool) or not isinstance(outcome_reward, (int, float)) \
            or not math.isfinite(outcome_reward):
        raise ValueError(f"outcome_reward = {outcome_reward!r}, expected a finite number")
    totals = []
    for i, r in enumerate(step_rewards):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise ValueError(f"step_rewards[{i}] = {r!r}, expected a finite number")
        totals.append(float(outcome_reward) + float(r))
    return totals


@dataclasses.dataclass
class StepRecord:
    """One main-line turn: the assistant's reply and the environment's answer to it."""

    turn_index: int
    action: str
    observation: Observation
    done: bool
    outcome_reward: float


@dataclasses.dataclass
class EpisodeResult:
    """One episode. `messages` is the transcript as the server saw it: [system?], the first
    observation, then assistant reply / observation pairs (the last observation included).
    `done` is False when max_turns ran out or an error ended the episode."""

    session_id: str
    task_id: str
    env: str
    messages: list[dict[str, str]]
    steps: list[StepRecord]
    outcome_reward: float = 0.0
    done: bool = False
    error: str | None = None

    @property
    def turns(self) -> int:
        return len(self.steps)

    def to_json_dict(self) -> dict[str, Any]:
        """One JSONL line of a results file: the transcript, rewards and per-step records."""
        return {"session_id": self.session_id, "task_id": self.task_id, "env": self.env,
                "done": self.done, "outcome_reward": self.outcome_reward, "turns": self.turns,
                "error": self.error, "messages": self.messages,
                "steps": [{"turn_index": s.turn_index, "action": s.action,
                           "observation": dataclasses.asdict(s.observation), "done": s.done,
                           "outcome_reward": s.outcome_reward} for s in self.steps]}


def chat_completions_url(base_url: str) -> str:
    """`http://h:p` or `http://h:p/v1` → `http://h:p/v1/chat/completions`."""
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


class ChatError(RuntimeError):
    pass


async def _post(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                headers: dict[str, str]) -> httpx.Response:
    """POSTs `body`; the response if it is a 200, else ChatError naming the failure."""
    try:
        response = await client.post(url, json=body, headers=headers)
    except httpx.HTTPError as e:
        raise ChatError(f"POST {url} failed: {type(e).__name__}: {e}") from e
    if response.status_code != 200:
        raise ChatError(f"POST {url}: HTTP {response.status_code}: {response.text[:300]}")
    return response


async def _chat(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                headers: dict[str, str]) -> str:
    """One chat completion; returns the assistant's text ("" when content is null)."""
    response = await _post(client, url, body, headers)
    try:
        message = response.json()["choices"][0]["message"]
        content = message.get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ChatError(f"POST {url}: not a chat completion ({type(e).__name__}: {e}): "
                        f"{response.text[:300]}") from e
    if content is not None and not isinstance(content, str):
        raise ChatError(f"POST {url}: choices[0].message.content = {content!r}, expected a str")
    return content or ""


async def run_episode(client: httpx.AsyncClient, url: str, env: Environment, task: Mapping[str, Any],
                      session_id: str, *, model: str, max_turns: int, sampling: Mapping[str, Any],
                      headers: Mapping[str, str], system_prompt: str | None = None,
                      tool_role: str = "tool", close_session: bool = True,
                      close_env: bool = True, executor: Executor | None = None) -> EpisodeResult:
    """One episode through the server; see the module docstring for the protocol. Environment
    calls (which may block: the terminal runs commands) run on `executor` (None: asyncio's)."""
    loop = asyncio.get_running_loop()
    task_id = str(task.get("task_id", "")) if isinstance(task, Mapping) else ""
    result = EpisodeResult(session_id, task_id, getattr(env, "name", type(env).__name__), [], [])
    session_headers = {**headers, "X-Session-Id": session_id, "X-Turn-Type": "main"}
    session_body = {"model": model, "session_id": session_id, "turn_type": "main", "stream": False}
    if getattr(env, "outcome_rewards", False):  # a general agent: the outcome joins each step
        session_headers["X-Episode"] = "true"
        session_body["episode"] = True

    def add(observation: Observation) -> None:
        role = observation.role if observation.role == "user" else tool_role
        result.messages.append({"role": role, "content": observation.text})

    try:
        if system_prompt:
            result.messages.append({"role": "system", "content": system_prompt})
        add(await loop.run_in_executor(executor, env.reset, task))
        while result.turns < max_turns and not result.done:
            body = {**sampling, **session_body, "messages": list(result.messages)}
            reply = await _chat(client, url, body, session_headers)
            result.messages.append({"role": "assistant", "content": reply})
            observation, done, outcome = await loop.run_in_executor(executor, env.step, reply)
            result.steps.append(StepRecord(result.turns, reply, observation, bool(done), float(outcome)))
            add(observation)
            result.done = bool(done)
            if done:
                result.outcome_reward = float(outcome)
    except ChatError as e:
        result.error = str(e)
    except Exception as e:  # an environment bug or bad task ends this episode only
        result.error = f"environment {result.env}: {type(e).__name__}: {e}"
    if close_env:
        try:
            await loop.run_in_executor(executor, env.close)
        except Exception as e:  # noqa: BLE001 - one environment's cleanup never stops the run
            closing = f"environment {result.env}: close failed: {type(e).__name__}: {e}"
            result.error = f"{result.error}; {closing}" if result.error else closing
    if close_session and result.turns > 0:
        # Close-only (max_tokens 0, no sampling fields that could override it): delivers the
        # last observation as the last turn's next state without generating a new turn.
        body = {**session_body, "messages": list(result.messages), "max_tokens": 0,
                "session_done": True, "outcome_reward": result.outcome_reward}
        done_headers = {**session_headers, "X-Session-Done": "true",
                        "X-Outcome-Reward": repr(result.outcome_reward)}
        try:
            await _post(client, url, body, done_headers)   # any 200 answer: closed
        except ChatError as e:
            closing = f"session_done call failed: {e}"
            result.error = f"{result.error}; {closing}" if result.error else closing
    return result


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default verifying TLS context, built once per process and shared by every
    client `run_episodes_async` makes: building one loads the CA bundle (tens of ms of CPU),
    and each call needs a new client (a client belongs to one event loop)."""
    return httpx.create_ssl_context()


async def run_episodes_async(base_url: str, envs_and_tasks: Sequence[tuple[Environment, Mapping[str, Any]]],
                             *, concurrency: int = 8, model: str = "default", api_key: str | None = None,
                             max_turns: int = 8, sampling: Mapping[str, Any] | None = None,
                             system_prompt: str | None = None, session_prefix: str | None = None,
                             headers: Mapping[str, str] | None = None, tool_role: str = "tool",
                             timeout_s: float = 120.0, close_session: bool = True,
                             close_envs: bool = True,
                             executor: Executor | None = None) -> list[EpisodeResult]:
    """Runs every (environment, task) pair as its own session, at most `concurrency` at once;
    returns the results in input order. Session ids are f"{session_prefix}-{i}" (prefix
    default: "ep-" + a random hex run id). `sampling` adds fields to every request body
    (temperature, max_tokens, ...); `api_key` is sent as a Bearer token; `tool_role` "user"
    sends tool outputs as user messages for servers without tool messages. Each environment
    must be a distinct object (they hold episode state). Environment calls run on `executor`
    (None: a pool of `concurrency` threads made for this call); a caller running round after
    round can pass one long-lived pool instead of starting threads every round."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency = {concurrency!r}, expected an int >= 1")
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
        raise ValueError(f"max_turns = {max_turns!r}, expected an int >= 1")
    if tool_role not in ("tool", "user"):
        raise ValueError(f"tool_role = {tool_role!r}, expected 'tool' or 'user'")
    pairs = list(envs_and_tasks)
    if len({id(env) for env, _ in pairs}) != len(pairs):
        raise ValueError("envs_and_tasks: an environment object appears twice, expected one per episode")
    prefix = session_prefix or f"ep-{uuid.uuid4().hex[:8]}"
    url = chat_completions_url(base_url)
    base_headers = dict(headers or {})
    if api_key:
        base_headers["Authorization"] = f"Bearer {api_key}"
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    # Environment calls get their own threads (one per concurrent episode), so a terminal
    # command that runs to its time limit never waits behind asyncio's small default pool.
    with contextlib.ExitStack() as stack:
        if executor is None:
            executor = stack.enter_context(
                ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="env"))
        async with httpx.AsyncClient(timeout=timeout_s, limits=limits,
                                     verify=tls_context()) as client:
            async def one(i: int, env: Environment, task: Mapping[str, Any]) -> EpisodeResult:
                async with gate:
                    return await run_episode(
                        client, url, env, task, f"{prefix}-{i}", model=model, max_turns=max_turns,
                        sampling=dict(sampling or {}), headers=base_headers,
                        system_prompt=system_prompt, tool_role=tool_role,
                        close_session=close_session, close_env=close_envs, executor=executor)

            return list(await asyncio.gather(*(one(i, env, task) for i, (env, task) in enumerate(pairs))))


def run_episodes(base_url: str, envs_and_tasks: Sequence[tuple[Environment, Mapping[str, Any]]],
                 **options: Any) -> list[EpisodeResult]:
    """`run_episodes_async` from synchronous code (not from inside a running event loop)."""
    return asyncio.run(run_episodes_async(base_url, envs_and_tasks, **options))


def summarize(results: Sequence[EpisodeResult]) -> dict[str, float]:
    """Counts and means for a progress line: episodes, done, errors, mean outcome, mean turns."""
    n = len(results)
    return {
        "episodes": float(n),
        "done": float(sum(r.done for r in results)),
        "errors": float(sum(r.error is not None for r in results)),
        "mean_outcome": sum(r.outcome_reward for r in results) / n if n else 0.0,
        "mean_turns": sum(r.turns for r in results) / n if n else 0.0,
    }


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits 2 (`parser.error`, naming the flag, the value and what is expected) on a flag no
    episode could run with: before any task is read or any file written."""
    counts = (("--episodes", args.episodes, 0), ("--concurrency", args.concurrency, 1),
              ("--max-turns", args.max_turns, 1), ("--shard-count", args.shard_count, 1))
    for flag, value, low in counts:
        if value < low:
            parser.error(f"{flag} = {value}, expected >= {low}")
    if not 0 <= args.shard_index < args.shard_count:
        parser.error(f"--shard-index = {args.shard_index}, expected 0 to --shard-count - 1 = "
                     f"{args.shard_count - 1}")
    if args.temperature is not None and not 0.0 <= args.temperature < math.inf:  # NaN too
        parser.error(f"--temperature = {args.temperature}, expected a finite number >= 0")
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error(f"--max-tokens = {args.max_tokens}, expected >= 1")
    if not 0.0 < args.time_limit_s < math.inf:
        parser.error(f"--time-limit-s = {args.time_limit_s}, expected a finite number of "
                     "seconds > 0")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m clawjax.rollout.runner --url URL --tasks SPEC --episodes N [...]`: runs N
    tasks of this worker's shard through the endpoint, appends one JSON line per episode to
    --out, and keeps the task stream's position in --state (resumed when the file exists)."""
    from clawjax.rollout import tasks as task_pipeline
    from clawjax.rollout.envs import EnvError, env_for_task

    parser = argparse.ArgumentParser(prog="python -m clawjax.rollout.runner", description=main.__doc__)
    parser.add_argument("--url", required=True, help="base URL of the OpenAI-compatible server")
    parser.add_argument("--tasks", required=True, help="PATH.jsonl or tfds:NAME[/SPLIT]")
    parser.add_argument("--tfds-data-dir", default=None)
    parser.add_argument("--episodes", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", default="default")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--max-turns", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-index", type=int, default=0)
    parser.add_argument("--shard-count", type=int, default=1)
    parser.add_argument("--session-prefix", default=None)
    parser.add_argument("--time-limit-s", type=float, default=5.0, help="terminal commands")
    parser.add_argument("--out", required=True, help="JSONL file the episode results are appended to")
    parser.add_argument("--state", default=None, help="file holding the task stream position")
    args = parser.parse_args(argv)
    check_args(parser, args)

    source = task_pipeline.task_source(args.tasks, data_dir=args.tfds_data_dir)
    stream = task_pipeline.TaskStream(source, seed=args.seed, shard_index=args.shard_index,
                                      shard_count=args.shard_count)
    if args.state and os.path.exists(args.state):
        with open(args.state, "rb") as f:
            stream.set_state(f.read())
    chosen = stream.take(args.episodes)
    pairs = []
    for task in chosen:
        kwargs = {"time_limit_s": args.time_limit_s} if task.get("env") == "terminal" else {}
        try:
            pairs.append((env_for_task(task, **kwargs), task))
        except EnvError as e:
            parser.error(f"task {task.get('task_id')!r} of --tasks {args.tasks}: {e}")
    sampling = {k: v for k, v in (("temperature", args.temperature), ("max_tokens", args.max_tokens))
                if v is not None}
    results = run_episodes(args.url, pairs, concurrency=args.concurrency, model=args.model,
                           api_key=args.api_key, max_turns=args.max_turns, sampling=sampling,
                           session_prefix=args.session_prefix)
    with open(args.out, "a") as f:
        for result in results:
            f.write(json.dumps(result.to_json_dict()) + "\n")
    if args.state:
        with open(args.state + ".tmp", "wb") as f:
            f.write(stream.get_state())
        os.replace(args.state + ".tmp", args.state)
    summary = summarize(results)
    print(" ".join(f"{k}={v:g}" for k, v in summary.items()), flush=True)
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
