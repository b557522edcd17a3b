"""From a judged turn to `Sample`s by method, and the rollout side's counters (`Stats`).

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

The asynchronous pipeline that calls these (judge, teacher, emit) is
`clawjax.rollout.judge_loop.JudgeLoop`; the batched push to the buffer is
`clawjax.rollout.pusher.Pusher`.
"""

from __future__ import annotations

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
from clawjax.sample import Sample, SampleError

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
