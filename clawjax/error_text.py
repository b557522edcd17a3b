"""How a bad value appears in an error message: its `repr`, cut to a readable length.

Every error that names a field, its value and what was expected (`SampleError`,
`ProtocolError`, `RequestError`, `EnvError`, `MalformedAnswer`) shows the value through
`shown_value`, so a huge prompt or array never floods a log line or an HTTP error body.
"""

from __future__ import annotations

from typing import Any

MAX_SHOWN_CHARS = 120


def shown_value(value: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    """`repr(value)`, or its first `limit - 3` characters and "..." when longer than `limit`."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
