"""`fsync_dir`: make a directory's entries durable (a created, renamed or deleted file).

One helper for every durable write in the package (the buffer's record files, checkpoints'
side files, published versions, the trainer's rejected-samples file). Imports `os` only.
"""

from __future__ import annotations

import os


def fsync_dir(path: str | os.PathLike) -> None:
    """Makes the entries of directory `path` durable (a created, renamed or deleted file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
