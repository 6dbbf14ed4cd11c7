"""Progress for long steps: one status line per stage and a bar per sweep, on stderr, only when asked.

Library calls print nothing by default. `rewrite.compile(..., progress=True)` (the CLI does so
unless `--quiet`) turns progress on for the duration of the call through a context variable,
so code deep in a pass (a calibration sweep) asks `enabled()` instead of having a flag
threaded through every signature.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("rewrite_progress", default=False)


def enabled() -> bool:
    """Whether the current call asked for progress output."""
    return _ENABLED.get()


@contextlib.contextmanager
def showing(on: bool | None) -> Iterator[None]:
    """Turn progress on (True) or off (False) inside the block; None keeps the caller's setting."""
    if on is None:
        yield
        return
    token = _ENABLED.set(bool(on))
    try:
        yield
    finally:
        _ENABLED.reset(token)


@contextlib.contextmanager
def stage(label: str) -> Iterator[None]:
    """`label ...` when the stage starts and `label: done in 1.2s` when it ends (if progress is on).

    Two plain lines rather than a redrawn one, so bars of nested sweeps (which clear
    themselves) and log lines in between never garble it, on a terminal or in a log file.
    """
    if not enabled():
        yield
        return
    print(f"{label} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        print(f"{label}: failed after {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        raise
    print(f"{label}: done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)


def bar(items: Iterable[T], desc: str, total: int | None = None, unit: str = "batch", show: bool | None = None) -> Iterable[T]:
    """A tqdm bar over `items` when progress is on (or `show` says so); the bare iterable otherwise."""
    if not (enabled() if show is None else show):
        return items
    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


def note(message: str) -> None:
    """A one-line message shown only when progress is on."""
    if enabled():
        print(message, file=sys.stderr, flush=True)
