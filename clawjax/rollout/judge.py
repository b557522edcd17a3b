"""The judges of one main-line turn (SPEC.md §7): PRM votes → reward, hint votes → hint, and the
teacher context the hint builds.

Pure pieces (unit-tested without servers):
  parse_vote(text)            the LAST `\\boxed{1|+1|0|-1}` in a judge answer, or None
  majority(votes)             majority over valid votes; none valid → 0; a tie for the top → 0
  parse_hint_answer(text)     (vote, hint text between the last HINT_START/HINT_END or None)
  select_hint(answers)        the longest hint of the +1 votes with stripped length > 10
  teacher_messages(msgs, h)   the prompt messages with HINT_PREFIX + hint appended to the
                              LAST user message (a copy; the input is not modified)

Async piece: `judge_turn(client, view, ...)` asks m PRM votes and/or m hint votes concurrently
through any OpenAI-compatible `/v1/chat/completions` (`SGLangClient.chat_completions`). A vote
whose call fails counts as invalid (logged), so a flaky judge yields reward 0, never an error.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import logging
import re
from typing import Any, Sequence

from clawjax.rollout import prompts
from clawjax.serving.client import ServingError

log = logging.getLogger(__name__)

_BOXED = re.compile(r"\\boxed\{\s*(\+?1|0|-1)\s*\}")
_HINT = re.compile(re.escape(prompts.HINT_START) + r"(.*?)" + re.escape(prompts.HINT_END), re.S)
MIN_HINT_CHARS = 10  # a hint must be longer than this once stripped
ANSWER_CHARS = 400   # judge answers kept in sample metadata are truncated to this


def parse_vote(text: Any) -> int | None:
    """The last `\\boxed{1}` / `\\boxed{+1}` / `\\boxed{0}` / `\\boxed{-1}` in `text` as an int, or
    None when there is none (or `text` is not a string)."""
    if not isinstance(text, str):
        return None
    found = _BOXED.findall(text)
    return int(found[-1]) if found else None


def majority(votes: Sequence[int | None]) -> int:
    """The most frequent valid vote (None = invalid); 0 when no vote is valid or when two
    values tie for the highest count."""
    counts = collections.Counter(v for v in votes if v is not None)
    if not counts:
        return 0
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return 0
    return ranked[0][0]


def parse_hint_answer(text: Any) -> tuple[int | None, str | None]:
    """(vote, hint) of one hint-judge answer; the hint is the text of the last
    `[HINT_START]…[HINT_END]` pair, or None."""
    if not isinstance(text, str):
        return None, None
    hints = _HINT.findall(text)
    return parse_vote(text), (hints[-1] if hints else None)


def select_hint(answers: Sequence[tuple[int | None, str | None]]) -> str | None:
    """The longest (stripped) hint among the +1 votes whose stripped length is > MIN_HINT_CHARS;
    the earliest wins a tie; None when there is none."""
    best: str | None = None
    for vote, hint in answers:
        if vote != 1 or hint is None:
            continue
        hint = hint.strip()
        if len(hint) > MIN_HINT_CHARS and (best is None or len(hint) > len(best)):
            best = hint
    return best


def teacher_messages(messages: Sequence[dict], hint: str) -> list[dict]:
    """A deep copy of the prompt `messages` whose LAST user message has
    `prompts.HINT_PREFIX + hint` appended to its content. Raises ValueError when there is no
    user message, or its content is not text."""
    out = copy.deepcopy(list(messages))
    for message in reversed(out):
        if message.get("role") == "user":
            if not isinstance(message.get("content"), str):
                raise ValueError(f"last user message content = {message.get('content')!r}, "
                                 "expected a string to append the hint to")
            message["content"] = message["content"] + prompts.HINT_PREFIX + hint
            return out
    raise ValueError("messages have no user message, expected one to append the hint to")


def last_user_text(messages: Sequence[dict]) -> str:
    """The content of the last user message ('' when there is none)."""
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return ""


@dataclasses.dataclass
class Judgement:
    """The judges' verdict on one turn. `votes`/`hint_votes` hold one entry per vote (None =
    invalid); `reward` = majority(votes); `hint` = select_hint(...) or None; `answers` and
    `hint_answers` are the raw answers, truncated to ANSWER_CHARS."""
    votes: list[int | None] = dataclasses.field(default_factory=list)
    reward: int = 0
    hint_votes: list[int | None] = dataclasses.field(default_factory=list)
    hint: str | None = None
    answers: list[str] = dataclasses.field(default_factory=list)
    hint_answers: list[str] = dataclasses.field(default_factory=list)


async def _ask(client, body: dict, timeout: float | None) -> str | None:
    try:
        out = await client.chat_completions(body, timeout=timeout)
        content = out["choices"][0]["message"]["content"]
        return content if isinstance(content, str) else None
    except (ServingError, KeyError, IndexError, TypeError) as e:
        log.warning("judge call failed (vote counted invalid): %s", e)
        return None


async def votes(client, messages: list[dict], m: int, *, model: str | None = None,
                temperature: float = 0.7, max_tokens: int | None = None,
                timeout: float | None = None) -> list[str | None]:
    """m independent answers to `messages` (None where a call failed)."""
    body: dict[str, Any] = {"messages": messages, "temperature": temperature}
    if model:
        body["model"] = model
    if max_tokens:
        body["max_tokens"] = max_tokens
    return list(await asyncio.gather(*(_ask(client, body, timeout) for _ in range(m))))


async def judge_turn(client, view: prompts.TurnView, *, m: int, prm: bool = True,
                     hint: bool = True, **vote_kwargs) -> Judgement:
    """Runs the m PRM votes (when `prm`) and the m hint votes (when `hint`) concurrently."""
    none: list[str | None] = []

    async def nothing() -> list[str | None]:
        return none

    prm_answers, hint_answers = await asyncio.gather(
        votes(client, prompts.prm_messages(view), m, **vote_kwargs) if prm else nothing(),
        votes(client, prompts.hint_messages(view), m, **vote_kwargs) if hint else nothing())
    out = Judgement()
    out.votes = [parse_vote(a) for a in prm_answers]
    out.reward = majority(out.votes)
    parsed = [parse_hint_answer(a) for a in hint_answers]
    out.hint_votes = [v for v, _ in parsed]
    out.hint = select_hint(parsed)
    out.answers = [(a or "")[:ANSWER_CHARS] for a in prm_answers]
    out.hint_answers = [(a or "")[:ANSWER_CHARS] for a in hint_answers]
    return out
