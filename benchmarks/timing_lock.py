"""One timing run at a time on a shared machine: an exclusive flock held while timing.

    with timing_lock("/path/to/timing.lock"):   # "" or None: no lock
        ...measure...
"""
from __future__ import annotations

import contextlib
import fcntl
from typing import Iterator


@contextlib.contextmanager
def timing_lock(path: str | None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (nothing when empty) while timing."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
