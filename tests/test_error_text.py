"""`shown_value`: how every field-naming error shows a bad value (repr, cut at 120 chars)."""

from __future__ import annotations

import numpy as np
import pytest

from clawjax.error_text import MAX_SHOWN_CHARS, shown_value
from clawjax.rollout.answers import MalformedAnswer
from clawjax.rollout.chatapi import RequestError
from clawjax.rollout.envs.base import EnvError
from clawjax.sample import SampleError
from clawjax.serving.fields import ProtocolError


def test_short_values_are_their_repr_and_long_ones_are_cut_to_the_limit():
    assert shown_value("abc") == "'abc'" and shown_value(None) == "None"
    exact = "x" * (MAX_SHOWN_CHARS - 2)                       # repr adds the two quotes
    assert shown_value(exact) == repr(exact) and len(shown_value(exact)) == MAX_SHOWN_CHARS
    long = "y" * 10_000
    assert shown_value(long) == repr(long)[:MAX_SHOWN_CHARS - 3] + "..."
    assert len(shown_value(long)) == MAX_SHOWN_CHARS
    assert shown_value(list(range(100)), limit=10) == "[0, 1, ..."


@pytest.mark.parametrize("error", [
    lambda v: SampleError("s1", "tokens", v, "ids"),
    lambda v: ProtocolError("prompt", v, "a string"),
    lambda v: RequestError("messages", v, "a list"),
    lambda v: EnvError("shell", "command", v, "a string"),
    lambda v: MalformedAnswer("text", v, "a string"),
])
def test_every_field_error_shows_a_huge_value_cut(error):
    huge = np.arange(100_000)
    message = str(error(huge))
    assert shown_value(huge) in message and len(message) < 300, message
    assert str(error(7)).count("7") >= 1 and "..." not in str(error(7))
