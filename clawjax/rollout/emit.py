"""From a judged turn to `Sample`s by method, the drop counters, and the buffer pusher.

`build_samples(turn, judgement, method, teacher_logp)` is pure. Per method (SPEC.md §7):
  rl       reward ±1 → one `kind=rl` sample; reward 0 → dropped (`zero_reward`).
  opd      a hint and teacher log-probs → one `kind=opd` sample with reward 0; no hint →
           `no_valid_hint`; a hint whose teacher answer was missing/misaligned →
           `teacher_failure` (never zero-filled).
  combine  both signals → ONE `kind=both` sample (reward ±1 and teacher_logp); one signal →
           that kind alone; the missing part is counted under its reason.
Each reason counts a turn at most once: in `combine` a turn emitted as `rl` whose OPD part had
no hint also counts one `no_valid_hint` (the counters say why a signal is missing, not only why
a whole turn was lost). A `both` sample that breaks the sample contract only in its OPD part
(the RL-only sample of the same turn validates) is emitted as `rl` with `teacher_failure`: a
bad teacher answer never costs the turn's RL signal.

No turn is lost uncounted: a teacher that fails in any way (server error, a malformed answer,
log-probs above `POSITIVE_LOGP_SLACK`, or an unexpected exception) counts `teacher_failure`
for the OPD part; an unexpected failure anywhere else while judging or building a turn (also an
episode's held turn) counts the turn under `invalid`, logged with its traceback.

A turn that never got a next state but was its session's only main turn (`LoneTurn`) is still
emitted, by `lone_sample`: `kind=rl`, reward 0, loss_mask all ones (no advantage, but it keeps
the session represented and its tokens count for the KL/entropy terms), metadata
`next_state_role = "none"`. Every other turn without a next state is not emitted at all and
counts under `no_next_state` (a sample whose loss_mask is all 0 would change nothing).

Episodes (SPEC §2, general agents: `JudgeJob.episode`): the judge loop holds a session's judged
turns until its `EpisodeEnd`, then builds them with `outcome_reward`: each step's reward is
r_outcome + r_process (its judged reward), so a step the judge scored 0 still trains on a nonzero
outcome, and `rl` drops a step only when that sum is 0. Such samples carry `step_rewards` (the
episode's judged rewards, in turn order) and metadata `outcome_reward` / `process_reward`.
An episode that ended without an outcome (expired, or closed without one) uses 0.

With `teacher_topk = K` (the proxy's `--teacher-topk`), an OPD part also carries the teacher's
top-K log-probs and token ids at each response position (`teacher_topk_logp/ids [R, K]`, SPEC
§5); a teacher answer without them counts as `teacher_failure` like a missing log-prob.

Samples carry `policy_version = policy_version_of(weight_version)`: the integer the server's
label ends with ("12" → 12, "step_12" → 12), 0 for labels without digits ("default").
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import time
import uuid
from typing import Sequence

import numpy as np

from clawjax.rollout.judge import Judgement
from clawjax.rollout.sessions import NextState, Turn
from clawjax.sample import MAX_TOPK, Sample, SampleError

log = logging.getLogger(__name__)

METHODS = ("combine", "rl", "opd")
# Server log-probs in (0, POSITIVE_LOGP_SLACK] are float rounding of a probability of 1: they are
# clamped to 0 (the proxy's rollout log-probs, the teacher's log-probs here); larger positive
# values are not log-probs at all (the turn, or the teacher answer, is refused).
POSITIVE_LOGP_SLACK = 1e-3
DROP_REASONS = ("no_next_state", "zero_reward", "no_valid_hint", "teacher_failure", "invalid")
HINT_META_CHARS = 2000
_TRAILING_INT = re.compile(r"(\d+)$")


def policy_version_of(weight_version: object) -> int:
    """The integer a weight_version label ends with; 0 when it has none."""
    match = _TRAILING_INT.search(str(weight_version or ""))
    return int(match.group(1)) if match else 0


def _votes_str(votes: Sequence[int | None]) -> str:
    return ",".join("x" if v is None else str(v) for v in votes)


def _sample(turn: Turn, kind: str, reward: float, teacher_logp, metadata: dict,
            teacher_topk=None) -> Sample:
    r = len(turn.response_ids)
    topk_logp, topk_ids = (None, None) if teacher_topk is None else teacher_topk
    return Sample(
        sample_id=f"{turn.session_id}:{turn.turn_index}:{kind}:{uuid.uuid4().hex[:12]}",
        tokens=np.asarray(list(turn.prompt_ids) + list(turn.response_ids), np.int32),
        response_len=r, loss_mask=np.ones((r,), np.float32),
        rollout_logp=np.asarray(turn.rollout_logp, np.float32), reward=float(reward), kind=kind,
        session_id=turn.session_id, turn_index=turn.turn_index,
        policy_version=policy_version_of(turn.weight_version),
        created_unix_ms=turn.created_unix_ms or int(time.time() * 1000),
        teacher_logp=None if teacher_logp is None else np.asarray(teacher_logp, np.float32),
        teacher_topk_logp=topk_logp, teacher_topk_ids=topk_ids, metadata=metadata)


def _metadata(turn: Turn, method: str, next_state: NextState | None,
              judgement: Judgement | None) -> dict[str, str]:
    meta = {"method": method, "weight_version": str(turn.weight_version),
            "next_state_role": next_state.role if next_state else "none"}
    if judgement is not None:
        meta["votes"] = _votes_str(judgement.votes)
        meta["reward"] = str(judgement.reward)
        meta["hint_votes"] = _votes_str(judgement.hint_votes)
        meta["hint"] = (judgement.hint or "")[:HINT_META_CHARS]
        meta["judge_answers"] = json.dumps(judgement.answers)
        meta["hint_answers"] = json.dumps(judgement.hint_answers)
    return meta


def _episode_fields(sample: Sample, outcome: float | None, process: float,
                    step_rewards: Sequence[float] | None) -> Sample:
    sample.metadata["outcome_reward"] = "none" if outcome is None else repr(float(outcome))
    sample.metadata["process_reward"] = repr(float(process))
    sample.step_rewards = np.asarray(step_rewards if step_rewards is not None else [process],
                                     np.float32)
    return sample


def build_samples(turn: Turn, next_state: NextState, judgement: Judgement, method: str,
                  teacher_logp=None, *, episode: bool = False,
                  outcome_reward: float | None = None,
                  step_rewards: Sequence[float] | None = None,
                  teacher_topk=None) -> tuple[list[Sample], list[str]]:
    """(samples, drop reasons) for one judged turn; see the module docstring. `teacher_logp
    [R]` is None when no hint was found or when the teacher failed; `teacher_topk` is None or
    the teacher's `(logp [R, K], ids [R, K])` (SPEC §5), kept with the OPD part. With
    `episode`, the reward is `outcome_reward` (None: 0) + the judged reward, and
    `step_rewards [S]` (the episode's judged rewards) is stored on the sample. Samples are
    validated; one that breaks the contract is dropped as `invalid` (logged)."""
    if method not in METHODS:
        raise ValueError(f"method = {method!r}, expected one of {METHODS}")
    drops: list[str] = []
    reward = float(judgement.reward)
    if episode:
        reward += 0.0 if outcome_reward is None else float(outcome_reward)
    rl_ok = method in ("rl", "combine") and reward != 0
    if method in ("rl", "combine") and not rl_ok:
        drops.append("zero_reward")
    opd_ok = False
    if method in ("opd", "combine"):
        if judgement.hint is None:
            drops.append("no_valid_hint")
        elif teacher_logp is None:
            drops.append("teacher_failure")
        else:
            opd_ok = True
    kind = "both" if rl_ok and opd_ok else "rl" if rl_ok else "opd" if opd_ok else None
    if kind is None:
        return [], drops

    def make(kind: str, with_teacher: bool) -> Sample:
        sample = _sample(turn, kind, reward if rl_ok else 0.0,
                         teacher_logp if with_teacher else None,
                         _metadata(turn, method, next_state, judgement),
                         teacher_topk if with_teacher else None)
        if episode:
            _episode_fields(sample, outcome_reward, judgement.reward, step_rewards)
        return sample

    try:
        return [make(kind, opd_ok).validate()], drops
    except SampleError as e:
        if kind != "both":
            log.warning("emit: dropping an invalid sample: %s", e)
            return [], drops + ["invalid"]
        error = e
    try:  # `both`: keep the RL part when the OPD part alone breaks the contract
        rl_only = make("rl", False).validate()
    except SampleError:
        log.warning("emit: dropping an invalid sample: %s", error)
        return [], drops + ["invalid"]
    log.warning("emit: OPD part of %s turn %d refused (kept as rl, teacher_failure): %s",
                turn.session_id, turn.turn_index, error)
    return [rl_only], drops + ["teacher_failure"]


def lone_sample(turn: Turn, method: str, *, episode: bool = False,
                outcome_reward: float | None = None) -> tuple[list[Sample], list[str]]:
    """The at-least-one sample of a session whose only main turn got no next state (never
    judged: process reward 0; an episode's reward is its outcome, for rl and combine)."""
    reward = 0.0
    if episode and method != "opd" and outcome_reward is not None:
        reward = float(outcome_reward)
    sample = _sample(turn, "rl", reward, None, _metadata(turn, method, None, None))
    sample.metadata["lone_turn"] = "1"
    if episode:
        _episode_fields(sample, outcome_reward, 0.0, None)
    try:
        return [sample.validate()], []
    except SampleError as e:
        log.warning("emit: dropping an invalid sample: %s", e)
        return [], ["invalid"]


class Stats:
    """Counters shown at `GET /stats` (names are stable: dashboards read them)."""

    def __init__(self):
        self.drops = {r: 0 for r in DROP_REASONS}
        self.emitted = {"rl": 0, "opd": 0, "both": 0}
        self.votes = {"1": 0, "0": 0, "-1": 0, "invalid": 0}
        self.rewards = {"1": 0, "0": 0, "-1": 0}
        self.judged_turns = 0
        self.hinted_turns = 0
        self.lone_turns = 0
        self.episodes = 0  # general-agent episodes whose held samples got their outcome
        self.served = collections.Counter()
        self.push = {"pushed": 0, "duplicates": 0, "batches": 0, "failures": 0, "queued": 0}

    def count_judgement(self, judgement: Judgement, has_prm: bool) -> None:
        self.judged_turns += 1
        self.hinted_turns += judgement.hint is not None
        for v in judgement.votes:
            self.votes["invalid" if v is None else str(v)] += 1
        if has_prm:
            self.rewards[str(judgement.reward)] += 1

    def count(self, samples: Sequence[Sample], drops: Sequence[str]) -> None:
        for s in samples:
            self.emitted[s.kind] += 1
        for d in drops:
            self.drops[d] += 1

    def snapshot(self) -> dict:
        return {"drops": dict(self.drops), "emitted": dict(self.emitted),
                "votes": dict(self.votes), "rewards": dict(self.rewards),
                "judged_turns": self.judged_turns, "hinted_turns": self.hinted_turns,
                "hint_share": self.hinted_turns / self.judged_turns if self.judged_turns else 0.0,
                "lone_turns": self.lone_turns, "episodes": self.episodes,
                "served": dict(self.served),
                "push": dict(self.push)}


class Pusher:
    """Pushes samples to the buffer in batches from a bounded queue (`maxsize` samples:
    `put` waits when it is full). A failed push is logged and retried with backoff, never
    dropped; a batch the buffer refuses as invalid is retried one sample at a time and only the
    refused samples are dropped (counted as `invalid`). `client.push` is the synchronous
    `BufferClient.push`, run in a worker thread."""

    def __init__(self, client, stats: Stats, *, batch: int = 64, maxsize: int = 4096,
                 linger_s: float = 0.01, backoff_s: float = 0.2, backoff_max_s: float = 5.0):
        self.client, self.stats = client, stats
        self.batch, self.linger_s = batch, linger_s
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.queue: asyncio.Queue[Sample] = asyncio.Queue(maxsize)
        self._task: asyncio.Task | None = None
        self._busy = 0

    def start(self) -> "Pusher":
        self._task = asyncio.create_task(self._run(), name="buffer-pusher")
        return self

    async def put(self, sample: Sample) -> None:
        await self.queue.put(sample)
        self.stats.push["queued"] = self.queue.qsize()

    async def drain(self, timeout: float = 30.0) -> bool:
        """Waits until every queued sample is pushed; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.queue.qsize() or self._busy:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            first = await self.queue.get()
            self._busy = 1
            batch = [first]
            deadline = time.monotonic() + self.linger_s
            while len(batch) < self.batch:
                try:
                    batch.append(self.queue.get_nowait())
                except asyncio.QueueEmpty:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    await asyncio.sleep(min(left, 0.002))
            self.stats.push["queued"] = self.queue.qsize()
            await self._push(batch)
            self._busy = 0

    async def _push(self, batch: list[Sample]) -> None:
        from clawjax.buffer.errors import InvalidSampleError
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                res = await loop.run_in_executor(None, self.client.push, batch)
                self.stats.push["pushed"] += res.accepted
                self.stats.push["duplicates"] += res.duplicates
                self.stats.push["batches"] += 1
                return
            except InvalidSampleError as e:
                if len(batch) == 1:
                    log.error("buffer refused sample %s: %s", batch[0].sample_id, e)
                    self.stats.drops["invalid"] += 1
                    self.stats.emitted[batch[0].kind] -= 1
                    return
                for sample in batch:
                    await self._push([sample])
                return
            except Exception as e:  # noqa: BLE001 - never drop: log, back off, retry
                self.stats.push["failures"] += 1
                delay = min(self.backoff_s * 2 ** attempt, self.backoff_max_s)
                log.warning("buffer push of %d samples failed (retry in %.1fs): %s",
                            len(batch), delay, e)
                attempt += 1
                await asyncio.sleep(delay)


class _Held:
    """An open episode's judged turns, waiting for its outcome: the tasks still judging them
    and the finished items `(turn, next_state, judgement, teacher)`, `teacher` as
    `JudgeLoop._teacher` returns it (a lone turn: `(turn, None, None, None)`)."""

    def __init__(self):
        self.tasks: set[asyncio.Task] = set()
        self.items: list[tuple] = []


class JudgeLoop:
    """The asynchronous judge → teacher → emission pipeline behind the proxy. `handle(events)`
    (events of `clawjax.rollout.sessions`) only schedules tasks, so serving never waits; at most
    `concurrency` turns are judged at a time. An episode's turns are judged as they come and
    held until its `EpisodeEnd` (see the module docstring).

    Args: judge (an `SGLangClient` or anything with `chat_completions(body, timeout=)`),
    teacher (anything with `teacher_logprobs(prompt_ids, response_ids, top_k=)`, e.g. a
    `Fleet`), encode (`(messages, tools) -> prompt ids`, the chat template), pusher, stats,
    method, m (votes per judge), vote_kwargs (model, temperature, max_tokens, timeout of judge
    calls), teacher_topk (K > 0: OPD samples also carry the teacher's top-K log-probs and ids at
    each response position, SPEC §5).
    Only the judges a method uses are asked: `rl` skips the hint judge, `opd` the PRM.
    """

    def __init__(self, *, judge, teacher, encode, pusher: Pusher, stats: Stats, method: str,
                 m: int, concurrency: int = 16, vote_kwargs: dict | None = None,
                 teacher_topk: int = 0):
        if method not in METHODS:
            raise ValueError(f"method = {method!r}, expected one of {METHODS}")
        if m < 1:
            raise ValueError(f"m = {m}, expected >= 1 vote")
        if not 0 <= teacher_topk <= MAX_TOPK:
            raise ValueError(f"teacher_topk = {teacher_topk}, expected 0 (none) to {MAX_TOPK}")
        self.teacher_topk = int(teacher_topk)
        self.judge, self.teacher, self.encode = judge, teacher, encode
        self.pusher, self.stats, self.method, self.m = pusher, stats, method, m
        self.vote_kwargs = dict(vote_kwargs or {})
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task] = set()
        self._held: dict[str, _Held] = {}  # open episodes by session id

    def handle(self, events: Sequence) -> None:
        from clawjax.rollout.sessions import Dropped, EpisodeEnd, JudgeJob, LoneTurn
        for event in events:
            if isinstance(event, JudgeJob):
                held = self._held.setdefault(event.turn.session_id, _Held()) \
                    if event.episode else None
                task = self._spawn(self._judged(event.turn, event.next_state, held))
                if held is not None:
                    held.tasks.add(task)
            elif isinstance(event, LoneTurn):
                self.stats.lone_turns += 1
                if event.episode:
                    self._held.setdefault(event.turn.session_id, _Held()).items.append(
                        (event.turn, None, None, None))
                else:
                    self._spawn(self._emit(*lone_sample(event.turn, self.method)))
            elif isinstance(event, EpisodeEnd):
                held = self._held.pop(event.session_id, None) or _Held()
                self._spawn(self._end_episode(held, event.outcome_reward))
            elif isinstance(event, Dropped):
                self.stats.count([], [event.reason])

    def drop(self, reason: str) -> None:
        """Counts one turn dropped before judging (e.g. "invalid": unusable server log-probs)."""
        self.stats.count([], [reason])

    @property
    def busy(self) -> int:
        return len(self._tasks)

    async def idle(self, timeout: float = 30.0) -> bool:
        """Waits until no turn is being judged and the pusher queue is empty."""
        deadline = time.monotonic() + timeout
        while self._tasks:
            await asyncio.wait(list(self._tasks), timeout=max(deadline - time.monotonic(), 0))
            if time.monotonic() > deadline:
                return False
        return await self.pusher.drain(max(deadline - time.monotonic(), 0.0))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("judge loop task failed", exc_info=task.exception())

    async def _emit(self, samples: list[Sample], drops: list[str]) -> None:
        self.stats.count(samples, drops)
        for sample in samples:
            await self.pusher.put(sample)

    async def _end_episode(self, held: _Held, outcome_reward: float | None) -> None:
        """Once every turn of the episode is judged: its samples, outcome added, in turn
        order. Every held turn is counted once: a judging task counts its own failure
        (`_judged`); one that still ended with an exception, or a turn whose samples cannot be
        built, counts as `invalid`."""
        if held.tasks:
            await asyncio.wait(held.tasks)
            for task in held.tasks:
                if task.cancelled() or task.exception() is not None:
                    self.stats.count([], ["invalid"])  # the task's error was logged by _done
        items = sorted(held.items, key=lambda item: item[0].turn_index)
        process = [float(j.reward) for _, _, j, _ in items if j is not None]
        self.stats.episodes += 1
        for turn, next_state, judgement, teacher in items:
            try:
                if judgement is None:
                    out = lone_sample(turn, self.method, episode=True,
                                      outcome_reward=outcome_reward)
                else:
                    t_logp, t_topk = teacher or (None, None)
                    out = build_samples(turn, next_state, judgement, self.method, t_logp,
                                        episode=True, outcome_reward=outcome_reward,
                                        step_rewards=process, teacher_topk=t_topk)
            except Exception:  # noqa: BLE001 - counted, never lost silently
                log.exception("emit: building episode step %s turn %d failed; counted as "
                              "invalid", turn.session_id, turn.turn_index)
                out = ([], ["invalid"])
            await self._emit(*out)

    async def _judged(self, turn: Turn, next_state: NextState,
                      held: _Held | None = None) -> None:
        """Judges one turn and emits its samples (or, for an episode, holds them in `held`).
        Never raises for a failure of its own: an unexpected exception counts the turn as
        `invalid` (logged with its traceback)."""
        try:
            verdict, teacher = await self._judge_and_teach(turn, next_state)
            if held is not None:
                held.items.append((turn, next_state, verdict, teacher))
                return
            t_logp, t_topk = teacher or (None, None)
            out = build_samples(turn, next_state, verdict, self.method, t_logp,
                                teacher_topk=t_topk)
        except Exception:  # noqa: BLE001 - counted, never lost silently
            log.exception("judging %s turn %d failed; counted as invalid", turn.session_id,
                          turn.turn_index)
            out = ([], ["invalid"])
        await self._emit(*out)

    async def _judge_and_teach(self, turn: Turn, next_state: NextState):
        """`(judgement, teacher)`, `teacher` as `_teacher` returns it (None without a hint)."""
        from clawjax.rollout import judge as judge_mod
        from clawjax.rollout.prompts import TurnView
        view = TurnView(judge_mod.last_user_text(turn.messages), turn.response_text,
                        next_state.role, next_state.text)
        async with self._slots:
            verdict = await judge_mod.judge_turn(
                self.judge, view, m=self.m, prm=self.method != "opd",
                hint=self.method != "rl", **self.vote_kwargs)
            self.stats.count_judgement(verdict, has_prm=self.method != "opd")
            teacher = None
            if verdict.hint is not None:
                teacher = await self._teacher(turn, verdict.hint)
        return verdict, teacher

    async def _teacher(self, turn: Turn, hint: str):
        """`(logp [R], top-K)` of the turn's response under the hinted prompt, top-K being None
        or `(logp [R, K], ids [R, K])` when `teacher_topk` is set; None when the teacher failed
        in any way (logged; counted by `build_samples` as teacher_failure). Log-probs in
        (0, POSITIVE_LOGP_SLACK] are clamped to 0; larger ones are a failure."""
        from clawjax.rollout.judge import teacher_messages
        from clawjax.serving.client import ServingError
        from clawjax.serving.teacher import TeacherLogprobError
        try:
            prompt_ids = self.encode(teacher_messages(turn.messages, hint), turn.tools)
            k = self.teacher_topk
            out = await self.teacher.teacher_logprobs(prompt_ids, turn.response_ids, top_k=k)
            logp = np.asarray(out.logp, np.float32)
            if logp.shape != (len(turn.response_ids),):
                raise TeacherLogprobError(f"teacher log-probs of shape {logp.shape}, expected "
                                          f"({len(turn.response_ids)},)")
            logp = _clamped_logp(logp, "teacher logp")
            if not k:
                return logp, None
            shape = (len(turn.response_ids), k)
            if out.topk_logp is None or np.shape(out.topk_logp) != shape or \
                    out.topk_ids is None or np.shape(out.topk_ids) != shape:
                raise TeacherLogprobError(
                    f"teacher top-K log-probs / ids of shapes {np.shape(out.topk_logp)} / "
                    f"{np.shape(out.topk_ids)}, expected {shape}")
            return logp, (_clamped_logp(np.asarray(out.topk_logp, np.float32),
                                        "teacher top-K logp"),
                          np.asarray(out.topk_ids, np.int32))
        except (TeacherLogprobError, ServingError, ValueError) as e:
            log.warning("teacher log-probs for %s turn %d failed, OPD part dropped: %s",
                        turn.session_id, turn.turn_index, e)
            return None
        except Exception:  # noqa: BLE001 - any teacher failure costs the OPD part only
            log.warning("teacher log-probs for %s turn %d failed unexpectedly, OPD part "
                        "dropped", turn.session_id, turn.turn_index, exc_info=True)
            return None


def _clamped_logp(logp: np.ndarray, what: str) -> np.ndarray:
    """`logp` with values in (0, POSITIVE_LOGP_SLACK] (rounding) set to 0. Raises
    TeacherLogprobError naming the first value that is not finite or is above the slack."""
    from clawjax.serving.teacher import TeacherLogprobError
    bad = ~np.isfinite(logp) | (logp > POSITIVE_LOGP_SLACK)
    if np.any(bad):
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise TeacherLogprobError(f"{what}{list(where)} = {float(logp[where])!r}, expected a "
                                  f"finite log-prob <= {POSITIVE_LOGP_SLACK} (values in (0, "
                                  f"{POSITIVE_LOGP_SLACK}] are rounding, clamped to 0)")
    return np.minimum(logp, 0.0)
