"""Session bookkeeping (SPEC.md §8): a pure state machine, no I/O, no clock of its own.

The proxy tells the table what happens, with the time `now` (seconds, any monotonic clock):

    index, events = table.begin(session_id, turn_type, messages, now, episode)  # a request
    events = table.finish(turn, now)        # its main-line response was generated (trainable)
    events = table.untrainable(session_id, index, now)  # ... or generated, not trainable
    table.end(session_id, index, now)       # the request was answered (or failed)
    events = table.close(session_id, outcome_reward)   # session_done (after the request's turn)
    events = table.expire(now)              # idle sessions, handled like session_done
    events = table.close_all()              # shutdown

and acts on the events returned:
  - `JudgeJob(turn, next_state)`: `turn` got its next state; judge it and emit samples.
  - `LoneTurn(turn)`: the session ended and `turn`, its ONLY main-line turn, never got a next
    state; it is still emitted (at-least-one guarantee) — see `clawjax.rollout.emit`.
  - `Dropped(turn, "no_next_state")`: the session ended and its last main-line turn, not its only
    one, never got a next state: not trained.
  - `EpisodeEnd(session_id, outcome_reward)`: an episode session ended (after its other
    events); its held samples can now get the outcome (None when it expired or closed without
    one).

Episodes (SPEC §2, general agents): a session any of whose requests says `episode` is one
episode of an environment with a verified outcome. Its `JudgeJob`s and `LoneTurn` carry
`episode=True`: the judge side holds their samples until `EpisodeEnd` and adds the outcome to
each step's judged (process) reward.

Rules:
  - Only `main` turns are trainable; `side` turns (title, memory calls) are served, get a
    turn index, and are otherwise ignored: they are neither judged nor a next state.
  - A main request whose messages END in user/tool messages (after its last assistant message)
    carries the next state of the session's pending main turn (the last finished main turn not
    yet judged): those trailing messages, role = the role of the last one, texts joined by
    newlines. System/developer messages among them (a reminder injected before the reply) are
    skipped: they are not the next state, the user/tool messages are (SPEC §8). Each turn is
    judged at most once. A main request whose messages are exactly the pending turn's own
    prompt (a client retrying or regenerating that request: its trailing messages came BEFORE
    the pending response, not after it) carries no next state.
  - Turn indices count every request of a session in arrival order, from 0 (but see below:
    a session id reused while requests of its closed session are in flight counts on).
  - A closed session is never recreated by a turn that finishes after its close (a request
    still generating when another request's session_done, or shutdown, closed it): the table
    keeps a tombstone of each session closed with requests in flight, and such a late turn is
    `Dropped(turn, "no_next_state")` at once (it can get no next state any more), except when it
    is the first main turn of a session that is not an episode: then it is that session's only
    one and becomes a `LoneTurn` (at-least-one guarantee). (An episode's `EpisodeEnd` is already
    out, so its late step cannot get the outcome: dropped.) A tombstone goes when the requests
    it waits for have ended, when it is older than `idle_expiry_s` (at `expire`), or when more
    than `max_tombstones` are kept (oldest first); a late turn that finds none is dropped too.
  - A new `begin` with a closed session's id opens a new session. While requests of the closed
    one are still in flight, the new session's turn indices go on after the closed one's, so a
    request is told apart by `(session_id, turn index)`: the open session takes only the
    indices it handed out and has not yet seen `end`. A late turn of the closed session
    (`finish`) and its `end` go to the closed session's tombstone (or, evicted, nowhere), never
    to the new session: they neither become its pending turn nor count against its requests in
    flight. (The table keeps, per id, where the closed sessions' indices ended until their last
    request has ended, tombstone or not.) Once none is in flight, a reused id counts from 0.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

TURN_TYPES = ("main", "side")
NEXT_ROLES = ("user", "tool")
# Between an answer and the reply to it: instructions (never a next state), passed over.
SKIPPED_ROLES = ("system", "developer")


@dataclasses.dataclass
class Turn:
    """One served main-line turn: the prompt `messages` (as the agent sent them), `prompt_ids`
    (chat template applied), `response_ids [R]`, `rollout_logp [R]` (from the policy server),
    the server's `weight_version` label, and the response text."""
    session_id: str
    turn_index: int
    messages: list[dict]
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logp: list[float]
    weight_version: str
    response_text: str
    created_unix_ms: int = 0
    tools: Any = None


@dataclasses.dataclass(frozen=True)
class NextState:
    role: str  # "user" | "tool"
    text: str


@dataclasses.dataclass
class JudgeJob:
    turn: Turn
    next_state: NextState
    episode: bool = False


@dataclasses.dataclass
class LoneTurn:
    turn: Turn
    episode: bool = False


@dataclasses.dataclass
class EpisodeEnd:
    session_id: str
    outcome_reward: float | None


@dataclasses.dataclass
class Dropped:
    turn: Turn
    reason: str


@dataclasses.dataclass
class _Session:
    first_index: int = 0  # this session's turn indices are first_index, first_index + 1, ...
    next_index: int = 0
    main_turns: int = 0
    pending: Turn | None = None
    last_seen: float = 0.0
    # Turn indices of the requests begun and not yet ended: the session is not idle.
    open: set[int] = dataclasses.field(default_factory=set)
    episode: bool = False


@dataclasses.dataclass
class _Tombstone:
    """A session closed with `in_flight` requests still running; its turn indices were
    `first_index` .. `next_index - 1`."""
    closed_at: float
    in_flight: int
    main_turns: int
    episode: bool
    first_index: int = 0
    next_index: int = 0


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def next_state_of(messages: Sequence[dict]) -> NextState | None:
    """The user/tool messages after the last assistant message (role = the last one's, texts
    joined by newlines), or None when the messages end otherwise (not in a user/tool message)
    or hold no assistant message before them. System/developer messages among them (a
    reminder or context the agent injected before the reply) are skipped: instructions, not
    the reply, so never part of the next state. Any other role there: None."""
    if not messages or messages[-1].get("role") not in NEXT_ROLES:
        return None
    tail: list[dict] = []
    for message in reversed(messages):
        role = message.get("role")
        if role == "assistant":
            tail.reverse()
            return NextState(tail[-1]["role"], "\n".join(_text(m.get("content")) for m in tail))
        if role in NEXT_ROLES:
            tail.append(message)
        elif role not in SKIPPED_ROLES:
            return None
    return None


class SessionTable:
    """Open sessions by id. `idle_expiry_s`: a session with no request in flight and none seen
    for this long is closed by `expire(now)` (a generation slower than the expiry never
    closes its own session). `max_tombstones`: at most this many sessions closed with requests
    in flight are remembered (see the module docstring), each for at most `idle_expiry_s`.
    The table's time is the latest `now` it was given (`close` takes none)."""

    def __init__(self, idle_expiry_s: float = 600.0, max_tombstones: int = 10_000):
        if not idle_expiry_s > 0:
            raise ValueError(f"idle_expiry_s = {idle_expiry_s}, expected > 0")
        if isinstance(max_tombstones, bool) or not isinstance(max_tombstones, int) or \
                max_tombstones < 0:
            raise ValueError(f"max_tombstones = {max_tombstones!r}, expected an int >= 0")
        self.idle_expiry_s = float(idle_expiry_s)
        self.max_tombstones = max_tombstones
        self._sessions: dict[str, _Session] = {}
        # Keyed by (session id, first turn index): an id may have several closed sessions
        # with requests in flight (closed, reused, closed again).
        self._tombstones: collections.OrderedDict[tuple[str, int], _Tombstone] = \
            collections.OrderedDict()
        self._tomb_keys: dict[str, set[int]] = {}  # session id -> first indices of its tombstones
        # Session id -> [next turn index, requests in flight] of its closed sessions, while any
        # of those requests has not ended (tombstones or not): a new session of the id counts
        # on from there. One small entry per id with such requests; never evicted.
        self._floors: dict[str, list[int]] = {}
        self._now = float("-inf")

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    @property
    def tombstones(self) -> int:
        """How many closed sessions still wait for requests in flight."""
        return len(self._tombstones)

    def _tick(self, now: float) -> None:
        self._now = max(self._now, float(now))

    def _tomb_of(self, session_id: str, turn_index: int) -> tuple[str, int] | None:
        """The key of the tombstone whose turn indices hold `turn_index`, if any."""
        for first in self._tomb_keys.get(session_id, ()):
            tomb = self._tombstones[(session_id, first)]
            if first <= turn_index < tomb.next_index:
                return session_id, first
        return None

    def _forget(self, key: tuple[str, int]) -> None:
        del self._tombstones[key]
        firsts = self._tomb_keys[key[0]]
        firsts.discard(key[1])
        if not firsts:
            del self._tomb_keys[key[0]]

    def _owner(self, session_id: str, turn_index: int) -> _Session | None:
        """The open session a request `(session_id, turn_index)` belongs to, if it is open."""
        session = self._sessions.get(session_id)
        if session is not None and turn_index in session.open:
            return session
        return None

    def begin(self, session_id: str, turn_type: str, messages: Sequence[dict],
              now: float, episode: bool = False) -> tuple[int, list]:
        """A request of `session_id` arrives: returns its turn index and the events (a
        `JudgeJob` when it carries the pending turn's next state). `episode` marks the session
        an episode for good."""
        if turn_type not in TURN_TYPES:
            raise ValueError(f"turn_type = {turn_type!r}, expected one of {TURN_TYPES}")
        self._tick(now)
        session = self._sessions.get(session_id)
        if session is None:  # a new session (its id may be a closed session's: module doc)
            first = self._floors.get(session_id, (0,))[0]
            session = self._sessions[session_id] = _Session(first_index=first, next_index=first)
        session.episode = session.episode or bool(episode)
        session.last_seen = now
        index = session.next_index
        session.next_index += 1
        session.open.add(index)
        events: list = []
        if turn_type == "main" and session.pending is not None and \
                list(messages) != list(session.pending.messages):  # not a retry of its prompt
            state = next_state_of(messages)
            if state is not None:
                events.append(JudgeJob(session.pending, state, session.episode))
                session.pending = None
        return index, events

    def finish(self, turn: Turn, now: float) -> list:
        """A main-line turn of an open session was generated: it becomes the session's pending
        turn. A still-pending older turn (its successor carried no next state) is dropped. A
        turn of a closed session is dropped (or, its first main turn, a `LoneTurn`); the
        session is not recreated (module docstring)."""
        self._tick(now)
        session = self._owner(turn.session_id, turn.turn_index)
        if session is None:  # closed (session_done, shutdown) while this turn was generating
            key = self._tomb_of(turn.session_id, turn.turn_index)
            if key is not None:
                tomb = self._tombstones[key]
                tomb.main_turns += 1
                if tomb.main_turns == 1 and not tomb.episode:
                    return [LoneTurn(turn)]
            return [Dropped(turn, "no_next_state")]
        session.last_seen = now
        session.main_turns += 1
        events: list = []
        if session.pending is not None:
            events.append(Dropped(session.pending, "no_next_state"))
        session.pending = turn
        return events

    def untrainable(self, session_id: str, turn_index: int, now: float) -> list:
        """Main-line turn `turn_index` was served but cannot be trained (unusable log-probs):
        the client goes on from its answer, so, as in `finish`, a still-pending older turn is
        dropped (the next request's trailing messages answer this turn, not that one). The
        turn itself becomes nothing. A turn of a closed session changes nothing."""
        self._tick(now)
        session = self._owner(session_id, turn_index)
        if session is None or session.pending is None:
            return []
        session.last_seen = now
        dropped, session.pending = session.pending, None
        return [Dropped(dropped, "no_next_state")]

    def end(self, session_id: str, turn_index: int, now: float) -> None:
        """The request `begin` counted as `turn_index` of `session_id` was answered or failed:
        it no longer keeps its session from expiring. For a session closed meanwhile it only
        releases the session's tombstone once the last request in flight at the close has
        ended."""
        self._tick(now)
        session = self._owner(session_id, turn_index)
        if session is not None:
            session.last_seen = now
            session.open.discard(turn_index)
            return
        floor = self._floors.get(session_id)
        if floor is not None and turn_index < floor[0]:
            floor[1] -= 1
            if floor[1] <= 0:
                del self._floors[session_id]
        key = self._tomb_of(session_id, turn_index)
        if key is not None:
            tomb = self._tombstones[key]
            tomb.in_flight -= 1
            if tomb.in_flight <= 0:
                self._forget(key)

    def close(self, session_id: str, outcome_reward: float | None = None) -> list:
        """session_done: the pending turn gets no next state; an episode also ends, with
        `outcome_reward` (ignored for other sessions)."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return []
        if session.open:
            floor = self._floors.setdefault(session_id, [0, 0])
            floor[0] = session.next_index
            floor[1] += len(session.open)
        if session.open and self.max_tombstones:
            key = (session_id, session.first_index)
            self._tombstones[key] = _Tombstone(  # `_now` >= every `now` seen so far
                closed_at=self._now, in_flight=len(session.open),
                main_turns=session.main_turns, episode=session.episode,
                first_index=session.first_index, next_index=session.next_index)
            self._tomb_keys.setdefault(session_id, set()).add(session.first_index)
            while len(self._tombstones) > self.max_tombstones:
                self._forget(next(iter(self._tombstones)))
        events: list = []
        if session.pending is not None:
            events.append(LoneTurn(session.pending, session.episode) if session.main_turns == 1
                          else Dropped(session.pending, "no_next_state"))
        if session.episode:
            events.append(EpisodeEnd(session_id, outcome_reward))
        return events

    def expire(self, now: float) -> list:
        """Closes every session idle for more than `idle_expiry_s`; forgets tombstones older
        than that."""
        self._tick(now)
        while self._tombstones:
            key, tomb = next(iter(self._tombstones.items()))
            if now - tomb.closed_at <= self.idle_expiry_s:
                break
            self._forget(key)
        idle = [sid for sid, s in self._sessions.items()
                if not s.open and now - s.last_seen > self.idle_expiry_s]
        events: list = []
        for sid in idle:
            events.extend(self.close(sid))
        return events

    def close_all(self) -> list:
        """Closes every open session, in flight or not (shutdown)."""
        events: list = []
        for sid in list(self._sessions):
            events.extend(self.close(sid))
        return events
