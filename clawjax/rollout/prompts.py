"""Every prompt the rollout side sends to a judge, and the parser for their layout.

Two judges read one main-line turn (SPEC.md §7): the process-reward judge (PRM) answers
whether the assistant's response served the user, using the next state as evidence, with a final
`\\boxed{1}`, `\\boxed{0}` or `\\boxed{-1}`; the hint judge answers whether the next state carries
hindsight that would have improved the response and, when it does, quotes it between
`[HINT_START]` and `[HINT_END]`.

The user message of both judges has the same delimited sections, in this order:

    <<<USER REQUEST>>>            the last user message the response answered
    <<<ASSISTANT RESPONSE>>>      the response being judged
    <<<NEXT STATE: user|tool>>>   what came next (a person's reply or a tool's output)

each closed by `<<<END>>>`. Texts are sanitised so they can never contain a section marker,
which lets `parse_judge_prompt` (used by the rule judge) read them back exactly. The first line
of each system prompt is a tag (`PRM_TAG`, `HINT_TAG`) naming which judge is asked.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

HINT_START = "[HINT_START]"
HINT_END = "[HINT_END]"
# Appended to the last user message to build the teacher context (SPEC.md §7).
HINT_PREFIX = "\n\n[user's hint / instruction]\n"

PRM_TAG = "[judge: process-reward]"
HINT_TAG = "[judge: hindsight-hint]"

_REQUEST = "<<<USER REQUEST>>>"
_RESPONSE = "<<<ASSISTANT RESPONSE>>>"
_NEXT = "<<<NEXT STATE: {role}>>>"
_END = "<<<END>>>"
_MARKER = re.compile(r"<<<|>>>")

PRM_SYSTEM = f"""{PRM_TAG}
You grade one turn of an assistant working for a user. You see the user's request, the
assistant's response, and the NEXT STATE: whatever happened right after the response, either
the user's next message or the output of a tool the assistant called. Treat the next state as
evidence of whether the response did what the user wanted.

Score +1 when the next state shows the response worked: the user thanks the assistant, approves,
or simply moves on to a new request; a tool ran successfully on the assistant's action.
Score -1 when the next state shows it did not: the user corrects the assistant, asks for the
same thing again in other words, asks for a redo, says the answer is wrong; a tool reports an
error caused by the assistant's action.
Score 0 when the next state does not tell either way.

Think briefly, then end your answer with exactly one of \\boxed{{1}}, \\boxed{{0}} or \\boxed{{-1}}.
Only the last \\boxed{{}} in your answer counts."""

HINT_SYSTEM = f"""{HINT_TAG}
You read one turn of an assistant working for a user: the user's request, the assistant's
response, and the NEXT STATE (the user's next message or a tool's output). Decide whether the
next state contains hindsight: information that, had the assistant known it before answering,
would have led to a better response (a correction, a stated preference, an instruction about
form or content, a missing fact).

If it does, end with \\boxed{{1}} and state that hindsight as a short, self-contained instruction
to the assistant between the markers, like this:
\\boxed{{1}}
{HINT_START}Give only the final number, without explanation.{HINT_END}
If it does not (thanks, approval, a new unrelated request, an unhelpful error), end with
\\boxed{{-1}} and write no markers."""


@dataclasses.dataclass(frozen=True)
class TurnView:
    """What a judge is shown about one turn: the last user `request`, the assistant's
    `response`, and the next state (`next_role` "user" or "tool", `next_text`)."""
    request: str
    response: str
    next_role: str
    next_text: str


def _clean(text: str) -> str:
    """Texts never contain a section marker ('<<<'/'>>>' become '<< <'/'> >>')."""
    return _MARKER.sub(lambda m: "<< <" if m.group(0) == "<<<" else "> >>", text)


def turn_text(view: TurnView) -> str:
    """The judges' user message: the three delimited sections of the module docstring."""
    return (f"{_REQUEST}\n{_clean(view.request)}\n{_END}\n"
            f"{_RESPONSE}\n{_clean(view.response)}\n{_END}\n"
            f"{_NEXT.format(role=view.next_role)}\n{_clean(view.next_text)}\n{_END}\n")


def prm_messages(view: TurnView) -> list[dict[str, str]]:
    """OpenAI chat messages asking the process-reward judge about `view`."""
    return [{"role": "system", "content": PRM_SYSTEM},
            {"role": "user", "content": turn_text(view) + "\nScore the assistant's response."}]


def hint_messages(view: TurnView) -> list[dict[str, str]]:
    """OpenAI chat messages asking the hint judge about `view`."""
    return [{"role": "system", "content": HINT_SYSTEM},
            {"role": "user", "content": turn_text(view) +
             "\nDoes the next state carry hindsight for the assistant?"}]


_SECTIONS = re.compile(
    re.escape(_REQUEST) + r"\n(?P<request>.*?)\n" + re.escape(_END) + r"\n" +
    re.escape(_RESPONSE) + r"\n(?P<response>.*?)\n" + re.escape(_END) + r"\n" +
    r"<<<NEXT STATE: (?P<role>\w+)>>>\n(?P<next>.*?)\n" + re.escape(_END), re.S)


def parse_judge_prompt(messages: Sequence[Any]) -> tuple[str, TurnView] | None:
    """Reads back a judge request built here: ("prm" | "hint", TurnView), or None when the
    messages are not a judge prompt of this module (an ordinary chat)."""
    if not messages or not isinstance(messages[0], dict):
        return None
    system = messages[0].get("content")
    if not isinstance(system, str):
        return None
    kind = "prm" if system.startswith(PRM_TAG) else "hint" if system.startswith(HINT_TAG) \
        else None
    if kind is None:
        return None
    user = next((m.get("content") for m in messages[1:]
                 if isinstance(m, dict) and m.get("role") == "user"), None)
    match = _SECTIONS.search(user) if isinstance(user, str) else None
    if match is None:
        return None
    return kind, TurnView(match["request"], match["response"], match["role"], match["next"])
