"""The whole OpenClaw-RL loop on one machine — what `python -m clawjax.train` runs by default.

    warm start (cached) → LocalStack: buffer, policy server, rule judge, proxy (processes)
                        → AgentPool: N simulated users talking to the proxy (process)
                        → Evaluator: held-out score of each new serving version (thread)
                        → TrainLoop: buffer → jitted step → checkpoint → gate → publish (main)

Serving is never paused: the publisher swaps weights on the server between decode steps. At
the end the run prints a summary table and writes `workdir/curve.png`; `metrics.jsonl` holds
every per-step metric, the held-out score among them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import httpx
import numpy as np

from clawjax import config as config_lib
from clawjax import default_task, report, warmstart
from clawjax import workdir as workdir_lib
from clawjax.evaluate import Evaluator
from clawjax.local_stack import LocalStack, share_accelerator
from clawjax.loop import TrainLoop
from clawjax.rollout.agents import AgentStats
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


class AgentPool:
    """The simulated users with the default task's hidden preference: `concurrency` sessions at
    a time through the proxy, cycling over the training tasks in a seeded shuffled order, in
    their own supervised process (`clawjax.rollout.agents`, a child of `stack`: restarted if it
    dies, its log in `logs/agents.log`).

    With `max_queued`, a round of episodes starts only while the buffer holds fewer than
    `max_queued` queued samples (`backlog_limit`): backpressure from the trainer. `stats()`
    reads the process's counters (episodes, errors, seconds waited for room in the buffer)."""

    NAME = "agents"

    def __init__(self, stack: LocalStack, tasks: list[dict], *, concurrency: int, seed: int,
                 temperature: float, max_tokens: int, max_queued: int | None = None):
        self.stack, self.tasks = stack, list(tasks)
        self.concurrency, self.seed = concurrency, seed
        self.temperature, self.max_tokens, self.max_queued = temperature, max_tokens, max_queued
        self.tasks_path = os.path.join(stack.logs, "agent_tasks.jsonl")
        self.stats_path = os.path.join(stack.logs, "agent_stats.json")
        self._started = time.monotonic()

    def start(self) -> "AgentPool":
        with open(self.tasks_path, "w") as f:
            f.writelines(json.dumps(t) + "\n" for t in self.tasks)
        if os.path.exists(self.stats_path):
            os.remove(self.stats_path)  # a resumed run's counters start again
        args = ["clawjax.rollout.agents", "--proxy-url", self.stack.proxy_url,
                "--tasks", self.tasks_path, "--stats", self.stats_path,
                "--concurrency", str(self.concurrency), "--seed", str(self.seed),
                "--temperature", repr(float(self.temperature)),
                "--max-tokens", str(self.max_tokens)]
        if self.max_queued:
            args += ["--buffer", self.stack.buffer_address,
                     "--max-queued", str(self.max_queued)]
        self._started = time.monotonic()
        self.stack.start_child(self.NAME, args, r"READY (agents)")
        return self

    def stop(self) -> None:
        """Stops the process after its round in flight (no-op when not running)."""
        self.stack.stop_child(self.NAME)

    def stats(self) -> AgentStats:
        return AgentStats.read(self.stats_path)

    def rate(self, stats: AgentStats | None = None) -> float:
        """Episodes per second since `start()`."""
        episodes = (stats or self.stats()).episodes
        return episodes / max(time.monotonic() - self._started, 1e-9)


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
            # The replay format requires rollout log-probs; the gate takes no ratio: zeros.
            s = Sample(sample_id=f"probe-{i}", tokens=prompt + response,
                       response_len=len(response), rollout_logp=np.zeros(len(response)))
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
    counts = agents.stats()
    out: dict = {"agent_episodes_per_s": agents.rate(counts), "agent_episodes": counts.episodes,
                 "agent_wait_s": counts.waited_s}
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


# The keys the local run sets to its own stack's values (`start_local`), and what each is there.
LOCAL_RUN_KEYS = {
    "model.path": "the warm-started policy (workdir/warmstart)",
    "buffer.address": "the local stack's rollout buffer",
    "publish.urls": "the local stack's policy server",
    "replay": "the samples, through the local stack's rollout buffer",
}


def _value(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def check_local_keys(config) -> None:
    """Raises `ConfigError` for the first of `LOCAL_RUN_KEYS` not at its `base_config()`
    default (''): the local run (`start_local`) supplies it, and would otherwise replace the
    user's value without a word (or fail late). No side effect: `start_local` runs it before
    any; `clawjax.train.check_start` may run it first when `rollout.local`."""
    base = config_lib.base_config()
    for key, supplied in LOCAL_RUN_KEYS.items():
        value, default = _value(config, key), _value(base, key)
        if value != default:
            raise config_lib.ConfigError(
                key, value, f"{default!r} in the local run (rollout.local = True), which "
                f"supplies {supplied} (--config.rollout.local=False to use your own)")


def start_local(config) -> LocalRun:
    """Warm start (cached), start the local stack, and point `config` at it (model path,
    buffer address, publish URL, gate probe). Shared by the default and the sequential run.
    `check_local_keys` first: a value of one of those keys given by the user is refused
    before anything is touched."""
    check_local_keys(config)
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
    agents = AgentPool(stack, run.train_tasks, concurrency=config.rollout.agents,
                       seed=config.trainer.seed, temperature=config.rollout.temperature,
                       max_tokens=config.rollout.max_tokens, max_queued=backlog_limit(config))
    loop = None
    stats_client = httpx.Client()
    try:
        if not evaluator.history:
            baseline = evaluator.evaluate_endpoint(config.eval.final_samples_per_task)
            print(f"warm-started policy: held-out score {baseline.score:.3f}", flush=True)
        loop = TrainLoop(config, extra_metrics=lambda: step_metrics(stack, agents, evaluator,
                                                                      stats_client))
        loop.install_signal_handlers()
        if loop.step > 0 and loop.publisher is not None:
            # Resumed: the loop publishes the restored policy; it is served before any rollout,
            # or every new sample would carry an older version and be dropped as stale.
            loop.publisher.wait(timeout=120)
        agents.start()
        evaluator.start()
        loop.run()
        agents.stop()
        evaluator.stop()
        if loop.publisher is not None:
            loop.publish_now()
            loop.publisher.wait(timeout=120)
        try:
            # the final policy, after its last publish landed
            evaluator.evaluate_endpoint(config.eval.final_samples_per_task)
        except (ServingError, OSError) as e:
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
