"""Whole writes to file descriptors and directory fsyncs, for the record files (the WAL's
segments, done.log, stale.log).

Invariants:
- `write_all` and `writev_all` return only once every byte was handed to the kernel, in order
  (a short write is continued, never dropped); an OSError propagates with part of the bytes
  possibly written: undoing that is the caller's job.
- `writev_all` passes the buffers to writev as they are (no per-buffer copy or view on the
  group-commit path); only a partly written one is re-sliced.
"""

from __future__ import annotations

import os

from clawjax.durable import fsync_dir as fsync_dir  # re-exported for the record files


def write_all(fd: int, data: bytes) -> None:
    """Writes all of `data` to `fd` (handles short writes)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


_IOV_MAX = 1024


def _nbytes(buf) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def writev_all(fd: int, buffers: list) -> int:
    """Writes every buffer in order (handles short writes); returns the byte count. Buffers are
    passed to writev as they are (no per-buffer view objects on the hot path: they would feed
    the cyclic GC); only a partly written one is re-sliced."""
    pending = [b for b in buffers if _nbytes(b)]
    sizes = [_nbytes(b) for b in pending]
    total = i = 0
    while i < len(pending):
        n = os.writev(fd, pending[i:i + _IOV_MAX])
        total += n
        while i < len(pending) and n >= sizes[i]:
            n -= sizes[i]
            i += 1
        if n:
            pending[i] = memoryview(pending[i]).cast("B")[n:]
            sizes[i] -= n
    return total
