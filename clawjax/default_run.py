"""The whole OpenClaw-RL loop on one machine — what `python -m clawjax.train` runs by default.

    warm start (cached) → LocalStack: buffer, policy server, rule judge, proxy (processes)
                        → AgentPool: N simulated users talking to the proxy (thread)
                        → Evaluator: held-out score of each new serving version (thread)
                        → TrainLoop: buffer → jitted step → checkpoint → gate → publish (main)

Serving is never paused: the publisher swaps weights on the server between decode steps. At
the end the run prints a summary table and writes `workdir/curve.png`; `metrics.jsonl` holds
every per-step metric, the held-out score among them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from clawjax import config as config_lib
from clawjax import default_task, report, warmstart
from clawjax import workdir as workdir_lib
from clawjax.buffer.client import BufferClient
from clawjax.evaluate import Evaluator
from clawjax.local_stack import LocalStack, share_accelerator
from clawjax.loop import TrainLoop
from clawjax.rollout.envs import env_for_task
from clawjax.rollout.runner import run_episodes_async
from clawjax.sample import Sample
from clawjax.serving.client import ServingError

log = logging.getLogger("clawjax.default_run")


def backlog_limit(config) -> int | None:
    """How many queued samples the simulated agents let pile up in the buffer before they wait
    (None: no limit, when `trainer.max_staleness` is unbounded). A sample generated now is
    trained about queued / samples_per_step steps later, by a policy already up to
    `publish.every_steps` versions ahead of the one serving it; keeping that sum within
    `max_staleness` keeps the agents from producing samples that would only be dropped as
    stale, whose CPU the trainer needs on a shared machine."""
    bound = config.trainer.max_staleness
    if bound < 0:
        return None
    steps = max(1, bound - max(config.publish.every_steps, 1))
    return steps * config.trainer.samples_per_step


def wait_for_room(queued, limit: int, stop: threading.Event, poll_s: float = 0.05) -> float:
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


class AgentPool:
    """Simulated users with the default task's hidden preference, `concurrency` sessions at a
    time through the proxy, cycling over the training tasks in a seeded shuffled order.

    With `buffer_address` and `max_queued`, a round of episodes starts only while the buffer
    holds fewer than `max_queued` queued samples (`backlog_limit`): backpressure from the
    trainer. `waited_s` counts the seconds the agents spent waiting for it."""

    def __init__(self, proxy_url: str, tasks: list[dict], *, concurrency: int, seed: int,
                 temperature: float, max_tokens: int, buffer_address: str | None = None,
                 max_queued: int | None = None):
        self.proxy_url, self.tasks = proxy_url, list(tasks)
        self.concurrency, self.seed = concurrency, seed
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens}
        self.buffer_address, self.max_queued = buffer_address, max_queued
        self.episodes = 0
        self.errors = 0
        self.waited_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()

    def _run(self) -> None:
        rng = random.Random(self.seed)
        round_index = 0
        # A short retry budget: while the buffer restarts, stats() fails within seconds and
        # wait_for_room lets the agents go on (the default budget would hold them 120 s).
        buffer = (BufferClient(self.buffer_address, retry_budget_s=5.0)
                  if self.buffer_address and self.max_queued else None)
        # One pool for the environments' calls across all rounds (not new threads per round).
        executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="env")
        try:
            while not self._stop.is_set():
                if buffer is not None:
                    self.waited_s += wait_for_room(lambda: buffer.stats()["queued"],
                                                   self.max_queued, self._stop)
                    if self._stop.is_set():
                        break
                batch = rng.sample(self.tasks, min(len(self.tasks), self.concurrency * 2))
                pairs = [(env_for_task(t), t) for t in batch]
                try:
                    results = asyncio.run(run_episodes_async(
                        self.proxy_url, pairs, concurrency=self.concurrency, max_turns=1,
                        sampling=self.sampling,
                        session_prefix=f"agents-{self.seed}-{round_index}", timeout_s=60.0,
                        executor=executor))
                except (httpx.HTTPError, OSError) as e:
                    log.warning("agent round failed: %s", e)
                    self.errors += 1
                    self._stop.wait(1.0)
                    continue
                self.episodes += len(results)
                self.errors += sum(r.error is not None for r in results)
                round_index += 1
        finally:
            executor.shutdown(wait=False)
            if buffer is not None:
                buffer.close()

    def rate(self) -> float:
        return self.episodes / max(time.monotonic() - self._started, 1e-9)

    def start(self) -> "AgentPool":
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="agents", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)


PROBE_TASKS = 32  # training prompts set aside as the regression gate's probe


def task_split(config) -> tuple[list[dict], list[dict], list[dict]]:
    """(rollout tasks, held-out tasks, gate probe tasks) of the default task, all disjoint.
    The probe (`PROBE_TASKS` training prompts, seeded) is set aside only when the gate is on
    and `gate.probe` names no file of its own; otherwise it is empty and every training prompt
    is rolled out."""
    train, heldout = default_task.split_tasks(config.warmstart.heldout_share,
                                              config.warmstart.seed)
    if not config.gate.enabled or config.gate.probe:
        return train, heldout, []
    rollout, probe = default_task.split_probe(train, min(PROBE_TASKS, len(train) // 2),
                                              config.warmstart.seed)
    return rollout, heldout, probe


def probe_file(path: str, tokenizer, tasks: list[dict]) -> str:
    """A gate probe set (JSONL): the `tasks`' prompts (training prompts that are never rolled
    out, see `task_split`) with answers in the preferred form."""
    with open(path, "w") as f:
        for i, t in enumerate(tasks):
            messages = [{"role": "user", "content": default_task.first_message(t)}]
            prompt, response = warmstart.encode(tokenizer, messages,
                                                default_task.answer(t, default_task.PREFERENCE))
            s = Sample(sample_id=f"probe-{i}", tokens=prompt + response,
                       response_len=len(response))
            f.write(s.to_json() + "\n")
    return path


def proxy_stats(url: str, client: httpx.Client | None = None) -> dict:
    """The proxy's `/stats` ({} when it does not answer). Pass a long-lived `client` on a hot
    path: a fresh one builds an SSL context, tens of ms of CPU (measured: a third of a
    training step's wall time)."""
    get = httpx.get if client is None else client.get
    try:
        return get(f"{url}/stats", timeout=2.0).json()
    except (httpx.HTTPError, ValueError):
        return {}


def step_metrics(stack: LocalStack, agents: AgentPool, evaluator: Evaluator,
                 client: httpx.Client | None = None) -> dict:
    """What the user sees per step besides the trainer's own numbers (DESIGN.md: no silent
    drops): loop rates, judge votes, hint share, emitted kinds, drops by reason, restarts."""
    out: dict = {"agent_episodes_per_s": agents.rate(), "agent_episodes": agents.episodes,
                 "agent_wait_s": agents.waited_s}
    stats = proxy_stats(stack.proxy_url, client)
    for group in ("drops", "emitted", "votes"):
        for key, value in stats.get(group, {}).items():
            out[f"{group}_{key}"] = value
    if stats:
        out["hint_share"] = stats.get("hint_share", 0.0)
    latest = evaluator.latest
    if latest is not None:
        out["heldout_score"] = latest.score
        out["heldout_version"] = float(latest.version) if latest.version.isdigit() else 0.0
    for name, count in stack.restarts().items():
        out[f"restarts_{name}"] = count
    return out


@dataclasses.dataclass
class LocalRun:
    """What `start_local` set up: the workdir, the warm-started policy's tokenizer, the
    default task's split (`train_tasks`: the prompts rolled out, without the gate's probe;
    `heldout`), and the started `LocalStack`."""

    workdir: str
    tokenizer: object
    train_tasks: list[dict]
    heldout: list[dict]
    stack: LocalStack


def start_local(config) -> LocalRun:
    """Warm start (cached), start the local stack, and point `config` at it (model path,
    buffer address, publish URL, gate probe). Shared by the default and the sequential run."""
    share_accelerator()  # before the warm start, this process's first JAX computation
    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    if not config.trainer.resume:  # a new run: an earlier one's files go aside, not into it
        moved = workdir_lib.archive_previous_run(workdir)
        if moved:
            print(f"new run: the earlier run's files in {workdir} were moved to {moved} "
                  "(the warm start is reused; --config.trainer.resume=True continues a run "
                  "instead)", flush=True)
    model_dir = warmstart.warm_start(os.path.join(workdir, "warmstart"), config.warmstart,
                                     progress=config.trainer.progress)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_tasks, heldout, probe_tasks = task_split(config)
    stack = LocalStack(workdir, model_dir, method=config.method,
                       prm_m=config_lib.resolved_prm_m(config),
                       max_batch=config.rollout.max_batch,
                       lease_timeout_s=config.rollout.lease_timeout_s,
                       server_platforms=config.rollout.server_platforms,
                       teacher_topk=config.rollout.teacher_topk).start()
    with config.unlocked():
        config.model.path = model_dir
        config.buffer.address = stack.buffer_address
        config.publish.urls = stack.policy_url
        if probe_tasks:
            config.gate.probe = probe_file(os.path.join(workdir, "gate_probe.jsonl"),
                                           tokenizer, probe_tasks)
    return LocalRun(workdir, tokenizer, train_tasks, heldout, stack)


def run_default(config) -> dict:
    """Runs the whole loop from `config` (configs/default.py); returns the summary dict."""
    run = start_local(config)
    workdir, stack = run.workdir, run.stack
    evaluator = Evaluator(stack.policy_url, stack.judge_url, run.tokenizer, run.heldout, workdir,
                          every_versions=config.eval.every_steps,
                          samples_per_task=config.eval.samples_per_task,
                          temperature=config.rollout.temperature,
                          max_tokens=config.rollout.max_tokens)
    agents = AgentPool(stack.proxy_url, run.train_tasks, concurrency=config.rollout.agents,
                       seed=config.trainer.seed, temperature=config.rollout.temperature,
                       max_tokens=config.rollout.max_tokens,
                       buffer_address=stack.buffer_address, max_queued=backlog_limit(config))
    loop = None
    stats_client = httpx.Client()
    try:
        if not evaluator.history:
            baseline = evaluator.evaluate_now(config.eval.final_samples_per_task)
            print(f"warm-started policy: held-out score {baseline.score:.3f}", flush=True)
        loop = TrainLoop(config, extra_metrics=lambda: step_metrics(stack, agents, evaluator,
                                                                      stats_client))
        loop.install_signal_handlers()
        if loop.step > 0 and loop.publisher is not None:
            # Resumed: serve the restored policy before any rollout, or every new sample would
            # carry the warm start's version and be dropped as stale.
            loop.publisher.maybe_publish(loop.step, (loop.graphdef, loop.state.params),
                                         loop.model_config, loop.policy_version, force=True)
            loop.publisher.wait(timeout=120)
        agents.start()
        evaluator.start()
        loop.run()
        agents.stop()
        evaluator.stop()
        if loop.publisher is not None:
            loop.publisher.maybe_publish(loop.step, (loop.graphdef, loop.state.params),
                                         loop.model_config, loop.policy_version, force=True)
            loop.publisher.wait(timeout=120)
        try:
            # the final policy, after its last publish landed
            evaluator.evaluate_now(config.eval.final_samples_per_task)
        except ServingError as e:
            log.warning("final evaluation failed: %s", e)
        summary = report.summarize(workdir, evaluator.history,
                                   proxy_stats(stack.proxy_url, stats_client),
                                   loop.dropped, stack.restarts())
        report.write_curve(workdir)
        print(report.table(summary), flush=True)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        return summary
    finally:
        agents.stop()
        evaluator.stop()
        stats_client.close()
        if loop is not None:
            loop.close()
        stack.stop()
