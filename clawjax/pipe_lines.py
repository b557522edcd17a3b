"""`PipeLines`: a child process's stdout, read line by line against a deadline that holds.

The pipe is read as raw bytes: `select()` says the descriptor has data, then exactly one
`read(2)` takes what is there (it cannot block), and lines are split here. So no byte waits in
a Python buffer where `select()` cannot see it (a ready line that arrived in the same read as
the line before it is found at once), and a partial line (no newline yet) never blocks a wait
past its deadline. Used by `clawjax.local_stack` and `clawjax.buffer.testing` to wait for a
child's ready line; imports the standard library only.
"""

from __future__ import annotations

import collections
import io
import re
import select
import time
from typing import Callable

MAX_LINE = 1 << 20   # bytes of one unfinished line kept; a longer one keeps its last MAX_LINE
POLL_S = 0.1         # the longest a wait goes without looking at its `give_up` condition
_CHUNK = 1 << 16


class PipeLines:
    """Complete lines of an unbuffered binary pipe: `proc.stdout` of a
    `subprocess.Popen(..., stdout=PIPE, bufsize=0)` not in text mode (an `io.FileIO`).

    Invariants: every byte read from the pipe is in `_lines` (complete lines, without their
    newline, not yet handed out) or `_partial` (the line still being written); nothing reads
    the pipe but this object, so what `select()` does not report is not there yet.
    """

    def __init__(self, pipe: io.RawIOBase):
        if not isinstance(pipe, io.RawIOBase):
            raise TypeError(f"PipeLines reads an unbuffered binary pipe (Popen bufsize=0, not "
                            f"text mode); got {type(pipe).__name__}, whose buffer would hide "
                            f"lines from select()")
        self._pipe = pipe
        self._lines: collections.deque[bytes] = collections.deque()
        self._partial = b""
        self.eof = False   # the writing end is closed: no more lines will come

    def wait_for(self, pattern: re.Pattern, deadline: float,
                 give_up: Callable[[], bool] = lambda: False) -> re.Match | None:
        """The match of `pattern` in the first line (decoded as UTF-8, newline removed) that
        has one, lines already read first; or None once `time.monotonic()` passes `deadline`,
        the pipe reaches end of file, or `give_up()` returns true (looked at every `POLL_S`
        at most). Lines before the matching one are consumed; returns within about `POLL_S`
        of the deadline whatever the child writes."""
        while True:
            while self._lines:
                match = pattern.search(self._lines.popleft().decode("utf-8", "replace"))
                if match:
                    return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.eof or give_up():
                return None
            self._read_once(min(POLL_S, remaining))

    def _read_once(self, timeout_s: float) -> None:
        """Waits up to `timeout_s` for the pipe to be readable, then reads once (no blocking:
        it has data or is at end of file) and splits what came into lines."""
        if not select.select([self._pipe], [], [], timeout_s)[0]:
            return
        chunk = self._pipe.read(_CHUNK)
        if not chunk:
            self.eof = True
            return
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        self._lines.extend(line.rstrip(b"\r") for line in complete)
        self._partial = self._partial[-MAX_LINE:]

    def drain(self) -> None:
        """Reads and discards the rest of the output (lines already read included) until end
        of file, so that the child never blocks on a full pipe. Blocks: run it in a thread.
        Ends quietly if the pipe is closed under it."""
        self._lines.clear()
        self._partial = b""
        try:
            while self._pipe.read(_CHUNK):
                pass
        except (OSError, ValueError):   # closed by its owner: nothing left to drain
            pass
        self.eof = True
