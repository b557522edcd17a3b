"""Held-out evaluation: the serving policy answers held-out tasks, the simulated user replies,
and the judge scores each reply exactly as in training (the same judge prompt and endpoint).

The score of one evaluation is the share of (task, sample) answers the judge rates +1, with
`samples_per_task` answers per task at the rollout temperature (of the answers judged: see
Judging below). Held-out tasks are never trained
on (DESIGN.md); the evaluator only talks to the policy server and the judge, never the proxy, so
an evaluation produces no training samples.

Versions: the server labels each answer with the weight version that produced all of it
(`meta_info.weight_version`; an answer without one is taken to be from the version the server
reported when the evaluation began). A point is labelled with the version of its answers. The
periodic points run while training goes on publishing, so one may be answered by several
versions: it is recorded as it is, `versions` counting the answers of each (`mixed`), labelled
with the first of them (the oldest) — never passed off as one version's score. The run's two
endpoints (the warm start, and the final policy after training stopped) must be one version:
answers from several raise `MixedVersions` and nothing is recorded.

Judging: an answer whose judge gave no valid vote (the call failed, e.g. the judge is down or
being restarted, or it answered without a `\\boxed` vote) is not a measurement. Training counts
it as reward 0 (SPEC.md §7); the evaluation leaves it out instead and counts it (`unjudged`).
A task's score is the share of its judged answers rated +1, and the score is the mean of the
task scores. A task none of whose answers was judged has no score, so the evaluation fails
(`JudgeUnavailable`, nothing recorded): a judge outage is never recorded as a score of 0, and
every recorded point scores the same tasks, which keeps the per-task pairing of two points
(`report.paired_change`) sound.
The run's two endpoints are tried again through a short outage (`Evaluator.evaluate_endpoint`);
a periodic point is skipped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time

from clawjax.rollout import judge as judge_lib
from clawjax.rollout import prompts
from clawjax.rollout.emit import policy_version_of
from clawjax.rollout.envs import env_for_task
from clawjax.serving.client import SGLangClient, ServingError

log = logging.getLogger("clawjax.evaluate")


class MixedVersions(ServingError):
    """An evaluation that must be one version's score was answered by several."""


class JudgeUnavailable(ServingError):
    """A held-out task got no valid judge vote for any of its answers (module docstring); `url`
    is the judge's."""


@dataclasses.dataclass
class EvalResult:
    version: str  # the version that answered (the oldest of them when `mixed`)
    score: float  # mean over tasks of the share of the task's judged answers rated +1
    n: int  # answers judged (those the score is over)
    seconds: float
    examples: list[dict]  # one answer per task; kept on the first and the latest in history
    task_scores: list[float] = dataclasses.field(default_factory=list)  # per task, task order
    # judged answers per weight version, oldest first ({version: n} when one version answered)
    versions: dict[str, int] = dataclasses.field(default_factory=dict)
    unjudged: int = 0  # answers left out: the judge gave no valid vote

    @property
    def mixed(self) -> bool:
        """The answers came from more than one weight version (a periodic point only)."""
        return len(self.versions) > 1

    def to_json(self) -> dict:
        return {"version": self.version, "score": self.score, "n": self.n,
                "seconds": self.seconds, "task_scores": self.task_scores,
                "versions": self.versions, "unjudged": self.unjudged}


async def _one(policy: SGLangClient, judge: SGLangClient, tokenizer, task: dict, *,
               temperature: float, max_tokens: int) -> tuple[int | None, str, str, str | None]:
    """(judged reward, or None when the judge gave no valid vote; answer; reply; version)."""
    env = env_for_task(task)
    first = env.reset(task)
    messages = [{"role": "user", "content": first.text}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    out = await policy.generate(input_ids=ids, sampling_params={
        "temperature": temperature, "max_new_tokens": max_tokens})
    answer = tokenizer.decode(out["output_ids"], skip_special_tokens=True).strip()
    reply, _, _ = env.step(answer)
    env.close()
    view = prompts.TurnView(request=first.text, response=answer, next_role=reply.role,
                            next_text=reply.text)
    verdict = await judge_lib.judge_turn(judge, view, m=1, hint=False, temperature=0.0)
    version = (out.get("meta_info") or {}).get("weight_version")
    judged = any(v is not None for v in verdict.votes)
    return (verdict.reward if judged else None, answer, reply.text,
            None if version is None else str(version))


async def evaluate_async(policy_url: str, judge_url: str, tokenizer, tasks: list[dict], *,
                         samples_per_task: int = 4, temperature: float = 1.0,
                         max_tokens: int = 16, concurrency: int = 16,
                         single_version: bool = False) -> EvalResult:
    """Scores the policy served at `policy_url` on `tasks` (see the module docstring: the
    result is labelled with the version of its answers). `single_version`: answers from more
    than one version raise `MixedVersions`; otherwise such a result is returned `mixed`.
    Answers without a valid judge vote are left out (`unjudged`); a task left without any
    judged answer raises `JudgeUnavailable` (module docstring: Judging)."""
    start = time.perf_counter()
    gate = asyncio.Semaphore(concurrency)
    async with SGLangClient(policy_url) as policy, SGLangClient(judge_url) as judge:
        at_start = str(await policy.get_weight_version() or "")

        async def bounded(task):
            async with gate:
                return await _one(policy, judge, tokenizer, task, temperature=temperature,
                                  max_tokens=max_tokens)

        jobs = [t for t in tasks for _ in range(samples_per_task)]
        results = await asyncio.gather(*(bounded(t) for t in jobs))
    k = samples_per_task
    per_task = [[r for r in results[i:i + k] if r[0] is not None]
                for i in range(0, len(results), k)]  # the judged answers of each task
    judged = [r for answers in per_task for r in answers]
    unjudged = len(results) - len(judged)
    missing = sum(not answers for answers in per_task)
    if missing:
        raise JudgeUnavailable(judge_url, f"no valid judge vote for any answer to {missing} of "
                                          f"{len(per_task)} held-out tasks ({unjudged} of "
                                          f"{len(results)} answers unjudged): the judge could "
                                          "not be reached or answered without a \\boxed vote")
    counts: dict[str, int] = {}
    for _, _, _, version in judged:
        label = at_start if version is None else version
        counts[label] = counts.get(label, 0) + 1
    versions = {v: counts[v] for v in sorted(counts, key=policy_version_of)}
    if single_version and len(versions) > 1:
        raise MixedVersions(policy_url, f"held-out answers came from weight versions "
                                        f"{', '.join(versions)}, not one")
    examples = [{"task_id": t["task_id"], "answer": a, "reply": rep}
                for t, (_, a, rep, _) in zip(jobs[::k], results[::k])]
    task_scores = [sum(r == 1 for r, _, _, _ in answers) / len(answers) for answers in per_task]
    return EvalResult(version=next(iter(versions), at_start),
                      score=sum(task_scores) / len(task_scores),
                      n=len(judged), seconds=time.perf_counter() - start, examples=examples,
                      task_scores=task_scores, versions=versions, unjudged=unjudged)


class Evaluator:
    """Evaluates each new serving version that is at least `every_versions` (an integer ≥ 1)
    past the newest version that answered the last evaluation, in a background thread; results
    go to `eval.jsonl`, `latest` and `history` (every result; the answer texts, `examples`,
    only on the first and the latest: a long run evaluates thousands of times)."""

    def __init__(self, policy_url: str, judge_url: str, tokenizer, tasks: list[dict], workdir: str,
                 *, every_versions: int = 4, samples_per_task: int = 4, temperature: float = 1.0,
                 max_tokens: int = 16):
        if isinstance(every_versions, bool) or not isinstance(every_versions, int) \
                or every_versions < 1:
            raise ValueError(f"every_versions = {every_versions!r}, expected an integer >= 1")
        self.policy_url, self.judge_url = policy_url, judge_url
        self.tokenizer, self.tasks = tokenizer, tasks
        self.every = every_versions
        self.kwargs = dict(samples_per_task=samples_per_task, temperature=temperature,
                           max_tokens=max_tokens)
        self.path = os.path.join(workdir, "eval.jsonl")
        self.history: list[EvalResult] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def latest(self) -> EvalResult | None:
        with self._lock:
            return self.history[-1] if self.history else None

    def evaluate_now(self, samples_per_task: int | None = None, *,
                     single_version: bool = True) -> EvalResult:
        """Evaluates the version being served now (blocking); `samples_per_task` overrides the
        evaluator's (the run's two endpoints use more answers than the periodic points).
        By default (an endpoint) the answers must be one version (`MixedVersions`, nothing
        recorded); the periodic points pass `single_version=False` and record a mix. A judge
        that left a task without any judged answer raises `JudgeUnavailable`, nothing recorded
        (the periodic thread skips the point, as for any `ServingError`)."""
        kwargs = dict(self.kwargs)
        if samples_per_task is not None:
            kwargs["samples_per_task"] = samples_per_task
        result = asyncio.run(evaluate_async(self.policy_url, self.judge_url, self.tokenizer,
                                            self.tasks, single_version=single_version,
                                            **kwargs))
        with open(self.path, "a") as f:   # first: a failed write records nothing at all
            f.write(json.dumps(result.to_json()) + "\n")
        with self._lock:
            if len(self.history) >= 2:   # the latest becomes a middle point: its texts go
                self.history[-1].examples = []
            self.history.append(result)
        log.info("held-out score %.3f at version %s (%d answers, %.1fs)%s%s", result.score,
                 result.version, result.n, result.seconds,
                 f"; {result.unjudged} answers left out, no valid judge vote"
                 if result.unjudged else "",
                 f"; answered by versions {result.versions}" if result.mixed else "")
        return result

    def evaluate_endpoint(self, samples_per_task: int | None = None, *,
                          patience_s: float = 120.0, retry_every_s: float = 5.0) -> EvalResult:
        """`evaluate_now` for one of the run's two endpoints (one version), tried again every
        `retry_every_s` while the policy server or the judge cannot be reached or the judge gave
        no vote (`JudgeUnavailable`), for up to `patience_s`: the local stack restarts a child
        that died within seconds, and the warm start's point is the baseline every later point
        is compared with, so a moment's outage must not end the run. `MixedVersions` is not
        tried again. Once the patience is spent, the last error is raised."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                return self.evaluate_now(samples_per_task)
            except MixedVersions:
                raise
            except (ServingError, OSError) as e:
                if time.monotonic() + retry_every_s > deadline:
                    raise
                log.warning("held-out evaluation failed, trying again in %.0fs: %s",
                            retry_every_s, e)
                time.sleep(retry_every_s)

    def _due(self, version: str) -> bool:
        last = self.latest
        if last is None:
            return True
        newest = next(reversed(last.versions), last.version)  # oldest first
        if not version.isdigit():
            return version != newest
        base = int(newest) if newest.isdigit() else 0  # the warm start is version 0
        return int(version) - base >= self.every

    def _run(self) -> None:
        async def current() -> str:
            async with SGLangClient(self.policy_url) as policy:
                return await policy.get_weight_version() or ""

        while not self._stop.wait(0.5):
            try:
                version = asyncio.run(current())
                if self._due(version):
                    self.evaluate_now(single_version=False)
            except (ServingError, OSError) as e:
                log.warning("evaluation skipped: %s", e)

    def start(self) -> "Evaluator":
        self._thread = threading.Thread(target=self._run, name="evaluator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
