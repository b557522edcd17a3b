"""`JudgeLoop`: the asynchronous judge → teacher → emission pipeline behind the proxy.

Session events (`clawjax.rollout.sessions`) become tasks: each judged turn's PRM votes and hint
(`clawjax.rollout.judge`), the teacher's log-probs under the hinted prompt, then the samples of
`clawjax.rollout.emit.build_samples`, queued on the `Pusher`. An episode's turns are held until
its `EpisodeEnd`. Every turn is counted in `emit.Stats` once, emitted or dropped with a reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Sequence

import numpy as np

from clawjax.rollout.emit import (METHODS, POSITIVE_LOGP_SLACK, Stats, build_samples,
                                  lone_sample)
from clawjax.rollout.pusher import Pusher
from clawjax.rollout.sessions import NextState, Turn
from clawjax.sample import MAX_TOPK, Sample

log = logging.getLogger(__name__)


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
