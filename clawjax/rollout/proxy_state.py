"""`Proxy`: the state the rollout proxy's handlers share, and its session hooks.

A served request goes `begin` (counts a main turn, its trailing messages the next state of the
pending one) → `record` (keeps the served turn, or marks it untrainable) → `end`; a
`session_done` call also closes the session. Session events go to the judge loop
(`JudgeThread.handle`). A turn is trainable only when every output token has a finite log-prob
≤ `POSITIVE_LOGP_SLACK` naming that token (values in (0, slack] are rounding, clamped to 0).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Mapping

from clawjax.rollout import chatapi
# POSITIVE_LOGP_SLACK: rollout log-probs in (0, slack] are rounding, clamped to 0 (shared with
# the teacher's log-probs in clawjax.rollout.judge_loop).
from clawjax.rollout.emit import POSITIVE_LOGP_SLACK, Stats
from clawjax.rollout.judge_loop import JudgeLoop
from clawjax.rollout.judge_thread import JudgeThread
from clawjax.rollout.sessions import SessionTable, Turn

log = logging.getLogger(__name__)


def prompt_ids(tokenizer, messages: list[dict], tools=None) -> list[int]:
    """Prompt ids of `messages` under `tokenizer`'s chat template, generation prompt appended."""
    kwargs = {"tools": tools} if tools else {}
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        **kwargs)
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return [int(t) for t in ids]


class Proxy:
    """What the handlers share: tokenizer, policy fleet, session table, judge loop, stats.
    `policy` is a started `Fleet` (or anything with `call(fn)` / `generate_raw(body)`); `loop`
    a `JudgeThread` (or a `JudgeLoop` on this event loop). Session events go to `loop.handle`;
    the judge side alone writes the judging counters of `stats`, serving alone `served`."""

    def __init__(self, *, tokenizer, policy, loop: JudgeThread | JudgeLoop, stats: Stats,
                 table: SessionTable, api_key: str | None = None, model_name: str = "policy"):
        self.tokenizer, self.policy, self.loop = tokenizer, policy, loop
        self.stats, self.table = stats, table
        self.api_key, self.model_name = api_key, model_name
        self.vocab_size = len(tokenizer)

    def encode(self, messages: list[dict], tools=None) -> list[int]:
        """Prompt ids of `messages` under the chat template, generation prompt appended."""
        return prompt_ids(self.tokenizer, messages, tools)

    # --- session hooks ----------------------------------------------------------------------
    def begin(self, call: chatapi.ChatCall) -> int:
        if call.session_id is None:
            self.stats.served["no_session"] += 1
            return 0
        index, events = self.table.begin(call.session_id, call.turn_type, call.messages,
                                         time.monotonic(), episode=call.episode)
        self.loop.handle(events)
        return index

    def record(self, call: chatapi.ChatCall, index: int, prompt_ids: list[int],
               result: dict) -> None:
        """Keeps a served main-line turn (when it is trainable) as its session's pending turn;
        an untrainable one still supersedes the older pending turn (`SessionTable.untrainable`)."""
        self.stats.served[call.turn_type] += 1
        if call.session_id is None or call.turn_type != "main":
            return
        turn = self._turn(call, index, prompt_ids, result)
        if turn is None:
            self.loop.drop("invalid")
            self.loop.handle(self.table.untrainable(call.session_id, index, time.monotonic()))
            return
        self.loop.handle(self.table.finish(turn, time.monotonic()))

    def end(self, call: chatapi.ChatCall, index: int) -> None:
        """After a request `begin` counted (as turn `index`), answered or failed."""
        if call.session_id is not None:
            self.table.end(call.session_id, index, time.monotonic())
        self.session_done(call)

    def session_done(self, call: chatapi.ChatCall) -> None:
        if call.session_id is not None and call.session_done:
            self.loop.handle(self.table.close(call.session_id, call.outcome_reward))

    def _turn(self, call, index: int, prompt_ids: list[int], result: dict) -> Turn | None:
        ids = [int(t) for t in result.get("output_ids") or []]
        meta = result.get("meta_info") or {}
        entries = meta.get("output_token_logprobs") or []
        if not ids or len(entries) != len(ids):
            log.warning("turn %s/%d not trainable: %d output ids, %d log-probs", call.session_id,
                        index, len(ids), len(entries))
            return None
        logp = []
        for tok, entry in zip(ids, entries):
            lp = entry[0] if isinstance(entry, (list, tuple)) and len(entry) >= 2 else None
            if not isinstance(lp, (int, float)) or not math.isfinite(lp) or \
                    lp > POSITIVE_LOGP_SLACK or int(entry[1]) != tok:
                log.warning("turn %s/%d not trainable: log-prob entry %r for token %d",
                            call.session_id, index, entry, tok)
                return None
            logp.append(min(float(lp), 0.0))
        return Turn(session_id=call.session_id, turn_index=index, messages=call.messages,
                    prompt_ids=prompt_ids, response_ids=ids, rollout_logp=logp,
                    weight_version=str(meta.get("weight_version", "")),
                    response_text=result.get("text") or "",
                    created_unix_ms=int(time.time() * 1000), tools=call.tools)
