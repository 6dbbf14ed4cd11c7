"""The test tiers: which cases of a sweep the fast tier runs.

`python -m pytest -q` runs the fast tier (everything not marked `slow`); `-m slow` the
end-to-end tier. A sweep over zoo models or settings keeps one or two cheap cases in the fast
tier, so every code path it covers still runs by default, and marks the rest slow.
"""
from __future__ import annotations

from typing import Any, Iterable

import pytest


def sweep(cases: Iterable[Any], fast: Iterable[Any]) -> list[Any]:
    """`cases` for `pytest.mark.parametrize`, each case not in `fast` marked `slow`."""
    fast = list(fast)
    cases = list(cases)
    missing = [f for f in fast if f not in cases]
    assert not missing, f"fast cases {missing} are not cases of the sweep"
    return [c if c in fast else pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow)
            for c in cases]
