"""The default run's components in strict sequence — the baseline of `python -m clawjax.bench
async`. Same warm start, LocalStack, simulated users and TrainLoop as `clawjax.default_run`, but
nothing overlaps; each training step is

    serve + judge:  `samples_per_step` episodes through the proxy (the agents only), repeated
                    until the buffer holds `samples_per_step` samples; after each round the proxy
                    is waited on until idle (`GET /stats?idle_timeout=S`: judged and pushed)
    train:          `TrainLoop.train_step(loop.take_samples())`, metrics, checkpoint
    publish:        the gated publish of `TrainLoop.maybe_publish` (every `publish.every_steps`),
                    then wait until the server reports the new `weight_version`

so the policy never generates while the trainer computes and vice versa. There is no held-out
evaluation here (it is not one of the four loops). `metrics.jsonl` has the same rows as the
default run's (plus `rollout_s`, `publish_wait_s`), so both runs' rates are read the same way.

    python -m clawjax.sequential_run --config.workdir=/tmp/seq --config.trainer.steps=20
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from concurrent.futures import Executor, ThreadPoolExecutor

import httpx

from clawjax.buffer.client import BufferClient
from clawjax.default_run import start_local
from clawjax.local_stack import LocalStack
from clawjax.loop import TrainLoop
from clawjax.rollout.envs import env_for_task
from clawjax.rollout.runner import run_episodes_async

log = logging.getLogger("clawjax.sequential_run")

IDLE_TIMEOUT_S = 120.0  # how long one wait for the proxy to go idle may take
MAX_ROUNDS = 20  # episode rounds per step before giving up (samples keep being dropped)


def wait_proxy_idle(client: httpx.Client, proxy_url: str,
                    timeout_s: float = IDLE_TIMEOUT_S) -> dict:
    """Blocks until the proxy's judge loop and buffer queue are idle; returns its stats."""
    reply = client.get(f"{proxy_url}/stats", params={"idle_timeout": timeout_s},
                       timeout=timeout_s + 30.0)
    reply.raise_for_status()
    stats = reply.json()
    if not stats.get("idle", False):
        log.warning("proxy still busy after %.0fs", timeout_s)
    return stats


def wait_weight_version(client: httpx.Client, policy_url: str, version: str,
                        timeout_s: float = 120.0) -> bool:
    """Polls the server's `/get_weight_version` until it equals `version`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            got = client.get(f"{policy_url}/get_weight_version", timeout=5.0).json()
            if str(got.get("weight_version")) == version:
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.05)
    return False


def rollout_phase(stack: LocalStack, buffer: BufferClient, http: httpx.Client,
                  tasks: list[dict], want: int, rng: random.Random, config, step: int,
                  executor: Executor | None = None) -> int:
    """Runs rounds of `want` episodes (one turn each, `rollout.agents` at a time) until the
    buffer holds `want` queued samples; returns the number of episodes run. `executor` runs
    the environments' calls (the default run's agents keep one pool for the whole run too)."""
    sampling = {"temperature": config.rollout.temperature,
                "max_tokens": config.rollout.max_tokens}
    episodes = 0
    for round_index in range(MAX_ROUNDS):
        if buffer.stats()["queued"] >= want:
            return episodes
        batch = [rng.choice(tasks) for _ in range(want)]
        results = asyncio.run(run_episodes_async(
            stack.proxy_url, [(env_for_task(t), t) for t in batch],
            concurrency=config.rollout.agents, max_turns=1, sampling=sampling,
            session_prefix=f"seq-{config.trainer.seed}-{step}-{round_index}", timeout_s=60.0,
            executor=executor))
        episodes += len(results)
        errors = [r.error for r in results if r.error is not None]
        if errors:
            log.warning("%d of %d episodes failed, e.g. %s", len(errors), len(results), errors[0])
        wait_proxy_idle(http, stack.proxy_url)
    if buffer.stats()["queued"] < want:
        raise RuntimeError(f"after {MAX_ROUNDS} rounds of {want} episodes the buffer holds "
                           f"{buffer.stats()['queued']} samples, expected >= {want}")
    return episodes


def run_sequential(config) -> dict:
    """Runs `trainer.steps` strict serve → judge → train → publish steps from `config` (the
    default run's config); returns {"steps", "samples_trained", "episodes", "wall_s"}."""
    run = start_local(config)
    workdir, stack, train_tasks = run.workdir, run.stack, run.train_tasks
    loop = None
    buffer = BufferClient(stack.buffer_address)
    http = httpx.Client()  # one for the whole run: each new client builds an SSL context
    executor = ThreadPoolExecutor(max_workers=config.rollout.agents, thread_name_prefix="env")
    rng = random.Random(config.trainer.seed)
    episodes = samples_trained = 0
    start = time.monotonic()
    try:
        loop = TrainLoop(config)
        loop.install_signal_handlers()
        want = loop.config.trainer.samples_per_step
        while loop.step < config.trainer.steps and not loop.stopping:
            t0 = time.monotonic()
            episodes += rollout_phase(stack, buffer, http, train_tasks, want, rng, config,
                                      loop.step, executor)
            t1 = time.monotonic()
            samples = loop.take_samples()
            if not samples:
                continue
            metrics = loop.train_step(samples)
            samples_trained += len(samples)
            if hasattr(loop.source, "set_policy_version"):
                loop.source.set_policy_version(loop.policy_version)
            if loop.step % config.checkpoint.every_steps == 0:
                loop.save_checkpoint()
            t2 = time.monotonic()
            published_before = loop.publisher.stats()["published"] if loop.publisher else 0
            loop.maybe_publish()
            if loop.publisher is not None and not loop.publisher.wait(timeout=120):
                log.warning("publish of step %d did not finish in 120s", loop.step)
            loop.settle_gate()  # a background gate's refusal: back to the accepted state
            if loop.publisher is not None and \
                    loop.publisher.stats()["published"] > published_before:
                if not wait_weight_version(http, stack.policy_url, str(loop.policy_version)):
                    log.warning("server never reported weight_version %d", loop.policy_version)
            metrics.update(rollout_s=t1 - t0, publish_wait_s=time.monotonic() - t2,
                           agent_episodes=episodes)
            loop.log_step(metrics)
            loop.checkpointer.poll()
        loop.flush_metrics()
        loop.save_checkpoint()
        loop.checkpointer.wait()
        summary = {"steps": loop.step, "samples_trained": samples_trained, "episodes": episodes,
                   "wall_s": time.monotonic() - start}
        with open(os.path.join(workdir, "sequential_summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(f"sequential run: {summary}", flush=True)
        return summary
    finally:
        executor.shutdown(wait=False)
        buffer.close()
        http.close()
        if loop is not None:
            loop.close()
        stack.stop()


def require_local(config) -> None:
    """Raises `ConfigError` unless `rollout.local`: the sequential run always runs the local
    stack (`start_local`), and `clawjax.train.check_start` checks a config by that key."""
    from clawjax.config import ConfigError

    if not config.rollout.local:
        raise ConfigError("rollout.local", config.rollout.local,
                          "True: the sequential run always runs the local stack "
                          "(configs/default.py)")


def train_sequential(config) -> None:
    """`run_sequential` after the start-up checks, with the compilation cache on."""
    from clawjax import compile_cache

    compile_cache.enable(compile_cache.resolve(config))  # as `python -m clawjax.train` does
    run_sequential(config)


def main(argv) -> int:
    """`clawjax.train`'s path (`run_checked`): the same start-up checks before any side effect,
    exit status 2 with one `error:` line for a `ConfigError`."""
    del argv
    from clawjax import train

    train.quiet_logging()
    return train.run_checked(train._CONFIG.value, train_sequential, first=require_local)


if __name__ == "__main__":
    from clawjax.train import run

    run(main)
