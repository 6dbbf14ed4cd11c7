r"""What a pass is: the base class, its context and result, and the registry of pass kinds.

This is the IR core's side of passes: it imports no pass. Each pass module subclasses
`Pass`, sets its class attributes and registers itself with `@register`; the pass manager
(`rewrite.passmanager`, the driver above) looks kinds up in `REGISTRY`, checks the order and
runs them.

Example: a pass that changes nothing but says so (a real pass rewrites `program`):
    >>> from pydantic import BaseModel
    >>> from rewrite.pass_base import Pass, PassResult, register
    >>> class NoteSpec(BaseModel):
    ...     kind: str = "note"
    >>> @register
    ... class NotePass(Pass):
    ...     kind = "note"
    ...     preserves_stats = True
    ...     def run(self, program, ctx):
    ...         return PassResult(program, summary="nothing rewritten", notes=["note pass ran"])
    >>> NotePass(NoteSpec()).name
    'note'
    >>> REGISTRY.pop("note") is NotePass
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel

from .calibration import CalibrationData
from .program import Program
from .spec import Spec

REGISTRY: dict[str, type["Pass"]] = {}
"""{spec kind: pass class}, filled by `@register` when a pass module is imported."""


def register(cls: type["Pass"]) -> type["Pass"]:
    """Class decorator: make a pass available under its spec `kind`."""
    REGISTRY[cls.kind] = cls
    return cls


@dataclass
class PassContext:
    """What a pass may use besides the program: calibration data, the original, settings."""

    spec: Spec
    calibration: CalibrationData
    original: Program
    index: int = 0
    state: set[str] = field(default_factory=set)
    """Graph properties established by earlier passes (e.g. 'quantized', 'tokens-pruned')."""
    task_loss: Any = None
    """Optional callable(output, batch) -> scalar loss for gradient-based importance."""
    progress: bool | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    """Calibration statistics shared between passes (see passes.importance). The manager
    clears it after every pass whose class does not set `preserves_stats = True`, because a
    rewrite changes the activations the statistics were collected on."""


@dataclass
class PassResult:
    program: Program
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Pass:
    """Base class of every pass. Subclasses set the class attributes and implement `run`."""

    kind: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    reads: ClassVar[frozenset[str]] = frozenset()
    """Annotation keys (node.meta["rewrite"]) this pass expects an earlier pass to have written."""
    writes: ClassVar[frozenset[str]] = frozenset()
    """Annotation keys this pass writes for later passes."""
    requires_absent: ClassVar[dict[str, str]] = {}
    """{property: why this pass cannot run once an earlier pass established it}."""
    establishes: ClassVar[frozenset[str]] = frozenset()
    preserves_stats: ClassVar[bool] = False
    """True for passes that do not change any activation (analysis-only passes)."""

    def __init__(self, spec: BaseModel):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.kind

    def check(self, program: Program, ctx: PassContext) -> None:
        """Raise PassError if the pass cannot apply to this program (before any work)."""

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        """Rewrite `program` (a fresh clone the pass may change) and say what changed in the result."""
        raise NotImplementedError
