"""Simulated users in their own process: `python -m clawjax.rollout.agents --proxy-url URL
--tasks FILE --stats FILE [--concurrency 8] [--seed 0] [--temperature 1.0] [--max-tokens 64]
[--buffer ADDR --max-queued Q]`.

The default run's N concurrent simulated users: rounds of 2·concurrency single-turn episodes
through the rollout proxy, `concurrency` sessions at a time, over the tasks of `--tasks` (JSONL,
one task per line, each naming its environment) in a seeded shuffled order. With `--buffer` and
`--max-queued`, a round starts only while the buffer holds fewer than `max_queued` queued
samples: backpressure from the trainer (`clawjax.default_run.backlog_limit`).

A process, not a thread of the trainer: the agents' HTTP client work (httpx on asyncio) is
Python that holds the GIL. As a thread of the default run's trainer process it held the GIL in
two of every three samples that any thread did (`py-spy --gil`, 2-core VM), while the training
thread's own Python (taking samples, packing, metrics, the publish hand-off) waited for it; on
the H200 host the concurrent run's trainer thread took 0.18 s a step for work that took 0.07 s
in the sequential run, and it, not the rollout, set the concurrent rate.

Prints `READY agents` once running. After every round it replaces `--stats` (JSON:
{"episodes", "errors", "waited_s", "rounds"}; `waited_s` = seconds spent waiting for room in the
buffer); a restarted process continues the counts it finds there. SIGTERM / SIGINT stop it after
the round in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import httpx

from clawjax.buffer.client import BufferClient
from clawjax.rollout.envs import ENVIRONMENTS, env_for_task
from clawjax.rollout.runner import run_episodes_async

log = logging.getLogger("clawjax.rollout.agents")


@dataclasses.dataclass
class AgentStats:
    """Counters of one agents process since it started."""

    episodes: int = 0
    errors: int = 0
    waited_s: float = 0.0
    rounds: int = 0

    def write(self, path: str) -> None:
        """Replaces `path` atomically (a reader never sees a half-written file)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(self), f)
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: str) -> "AgentStats":
        """The counters in `path`; zeros while the file does not exist yet."""
        try:
            with open(path) as f:
                return cls(**json.load(f))
        except FileNotFoundError:
            return cls()


def wait_for_room(queued: Callable[[], int], limit: int, stop: threading.Event,
                  poll_s: float = 0.05) -> float:
    """Blocks while `queued()` (the buffer's queued-sample count) is >= `limit`, or until `stop`
    is set; returns the seconds waited. A failing `queued()` ends the wait (agents must not
    stall on a restarting buffer: the trainer's staleness bound still protects training)."""
    start = time.monotonic()
    while not stop.is_set():
        try:
            if queued() < limit:
                break
        except Exception as e:  # noqa: BLE001 - any failure: stop throttling, log it
            log.warning("agents: buffer stats failed (%s); not waiting", e)
            break
        stop.wait(poll_s)
    return time.monotonic() - start


def run_rounds(proxy_url: str, tasks: list[dict], stop: threading.Event, stats: AgentStats, *,
               concurrency: int, seed: int, sampling: dict, buffer_address: str | None = None,
               max_queued: int | None = None,
               after_round: Callable[[AgentStats], None] = lambda s: None) -> None:
    """Runs rounds of episodes until `stop` is set, counting into `stats` and calling
    `after_round(stats)` after each round. A round that fails as a whole (the proxy down) is
    counted as one error and retried after a second.

    Every round attempt gets fresh session ids, `agents-{seed}-{run}-{attempt}-{i}`: `run` is
    random per call and `attempt` counts this call's attempts, failed ones too. A failed round,
    or a process killed during one (its stats still count the rounds before it), may leave its
    sessions open in the proxy; a later episode under one of those ids would be taken for their
    continuation."""
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:8]
    attempt = 0
    # A short retry budget: while the buffer restarts, stats() fails within seconds and
    # wait_for_room lets the agents go on (the default budget would hold them 120 s).
    buffer = (BufferClient(buffer_address, retry_budget_s=5.0)
              if buffer_address and max_queued else None)
    # One pool for the environments' calls across all rounds (not new threads per round).
    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="env")
    try:
        while not stop.is_set():
            if buffer is not None:
                stats.waited_s += wait_for_room(lambda: buffer.stats()["queued"], max_queued,
                                                stop)
                if stop.is_set():
                    break
            batch = rng.sample(tasks, min(len(tasks), concurrency * 2))
            prefix = f"agents-{seed}-{run}-{attempt}"
            attempt += 1
            try:
                results = asyncio.run(run_episodes_async(
                    proxy_url, [(env_for_task(t), t) for t in batch], concurrency=concurrency,
                    max_turns=1, sampling=sampling,
                    session_prefix=prefix, timeout_s=60.0,
                    executor=executor))
            except (httpx.HTTPError, OSError) as e:
                log.warning("agent round failed: %s", e)
                stats.errors += 1
                stop.wait(1.0)
                continue
            stats.episodes += len(results)
            stats.errors += sum(r.error is not None for r in results)
            stats.rounds += 1
            after_round(stats)
    finally:
        executor.shutdown(wait=False)
        if buffer is not None:
            buffer.close()


def read_tasks(path: str) -> list[dict]:
    """The tasks of a JSONL file; raises ValueError naming the file when there are none, or
    the file and line of a line that is not a JSON object naming a known environment."""
    tasks = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                task = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: {line.strip()[:80]!r} is not JSON ({e}), "
                                 "expected a JSON object (a task)") from None
            if not isinstance(task, dict):
                raise ValueError(f"{path}:{number}: {line.strip()[:80]!r}, expected a JSON "
                                 "object (a task)")
            if not isinstance(task.get("env"), str) or task["env"] not in ENVIRONMENTS:
                # Refused now: building its environment mid-run would end the process.
                raise ValueError(f"{path}:{number}: field 'env' = {task.get('env')!r}, "
                                 f"expected one of {sorted(ENVIRONMENTS)}")
            tasks.append(task)
    if not tasks:
        raise ValueError(f"--tasks {path}: no tasks, expected one JSON object per line")
    return tasks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m clawjax.rollout.agents", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proxy-url", required=True, help="the rollout proxy, http://host:port")
    p.add_argument("--tasks", required=True, help="JSONL, one task per line")
    p.add_argument("--stats", required=True, help="JSON counters file, replaced every round")
    p.add_argument("--concurrency", type=int, default=8, help="sessions at a time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--buffer", default=None, help="gRPC buffer address, for --max-queued")
    p.add_argument("--max-queued", type=int, default=None,
                   help="start a round only while the buffer holds fewer queued samples")
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error(f"--concurrency {args.concurrency}: expected >= 1")
    if not 0.0 <= args.temperature < math.inf:  # NaN fails this too
        p.error(f"--temperature {args.temperature}: expected a finite number >= 0")
    if args.max_tokens < 1:
        p.error(f"--max-tokens {args.max_tokens}: expected >= 1")
    if args.max_queued is not None and (args.max_queued < 1 or not args.buffer):
        p.error(f"--max-queued {args.max_queued}: expected >= 1, with --buffer")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    tasks = read_tasks(args.tasks)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # A restarted process goes on counting (its session ids are its own: `run_rounds`).
    stats = AgentStats.read(args.stats)
    stats.write(args.stats)
    print("READY agents", flush=True)
    run_rounds(args.proxy_url, tasks, stop, stats, concurrency=args.concurrency,
               seed=args.seed,
               sampling={"temperature": args.temperature, "max_tokens": args.max_tokens},
               buffer_address=args.buffer, max_queued=args.max_queued,
               after_round=lambda s: s.write(args.stats))
    stats.write(args.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
