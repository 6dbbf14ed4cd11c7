r"""What a pass is: the base class, its context and result, and the registry of pass kinds.

This is the IR core's side of passes: it imports no pass. A pass module defines its spec
class (a `StrictModel` with `kind: Literal["<kind>"]`) next to a `Pass` subclass that names it
in `spec_class`, and registers the pair with `@register`: that one decorator makes the kind
known to the pass manager (`REGISTRY`) and to the spec (`rewrite.spec.PASS_SPECS`: the union
`Spec.passes` accepts, the kind list of error messages and the JSON schema, with the field
docstrings as descriptions). Adding a pass kind is one new file in `passes/`.

Example: a pass that changes nothing but says so (a real pass rewrites `program`):
    >>> from typing import Literal
    >>> from rewrite.pass_base import Pass, PassResult, register, unregister
    >>> from rewrite.spec import Spec, StrictModel
    >>> class NoteSpec(StrictModel):
    ...     "Write a note into the report."
    ...     kind: Literal["note"] = "note"
    ...     text: str = "hello"
    ...     "What the note says."
    >>> @register
    ... class NotePass(Pass):
    ...     spec_class = NoteSpec
    ...     preserves_stats = True
    ...     def run(self, program, ctx):
    ...         return PassResult(program, summary="nothing rewritten", notes=[self.spec.text])
    >>> spec = Spec.load({"passes": [{"kind": "note", "text": "hi"}]})
    >>> NotePass(spec.passes[0]).name, spec.passes[0].text
    ('note', 'hi')
    >>> unregister("note") is NotePass
    True
"""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import BaseModel

from .calibration import CalibrationData
from .program import Program
from .spec import Spec, pass_kind, register_pass_spec, unregister_pass_spec

REGISTRY: dict[str, type["Pass"]] = {}
"""{spec kind: pass class}, filled by `@register` when a pass module is imported."""


class Property(StrEnum):
    """Graph properties a pass establishes and later passes may require absent (the ordering rules)."""

    PRUNED = "pruned"
    QUANTIZED = "quantized"
    ROTATED = "rotated"
    TOKENS_PRUNED = "tokens-pruned"


class Need(StrEnum):
    """What a pass needs from the caller besides the program (checked before any pass runs)."""

    CALIBRATION = "calibration"
    """Real calibration batches (`rewrite.compile(..., calibration=...)`)."""


def register(cls: type["Pass"]) -> type["Pass"]:
    """Class decorator: make a pass and its spec class available under the spec's `kind`."""
    if cls.spec_class is None:
        raise TypeError(f"{cls.__name__} needs spec_class = <its spec model> (a StrictModel with a kind field)")
    cls.kind = pass_kind(cls.spec_class)
    REGISTRY[cls.kind] = cls
    register_pass_spec(cls.spec_class)
    return cls


def unregister(kind: str) -> type["Pass"] | None:
    """Remove a pass kind (and its spec) again; for tests and examples that register a throwaway pass."""
    unregister_pass_spec(kind)
    return REGISTRY.pop(kind, None)


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
    """Base class of every pass. Subclasses set `spec_class` and the other class attributes and implement `run`."""

    spec_class: ClassVar[type[BaseModel] | None] = None
    """The pass's spec model; its `kind` field names the pass (set by `@register`)."""
    kind: ClassVar[str] = ""
    reads: ClassVar[frozenset[str]] = frozenset()
    """Annotation keys (node.meta["rewrite"]) this pass expects an earlier pass to have written."""
    writes: ClassVar[frozenset[str]] = frozenset()
    """Annotation keys this pass writes for later passes."""
    requires_absent: ClassVar[dict[Property, str]] = {}
    """{property: why this pass cannot run once an earlier pass established it}."""
    establishes: ClassVar[frozenset[Property]] = frozenset()
    """Properties this pass gives the graph (later passes' `requires_absent` refer to them)."""
    preserves_stats: ClassVar[bool] = False
    """True for passes that do not change any activation (analysis-only passes)."""

    def __init__(self, spec: BaseModel):
        self.spec = spec

    @property
    def name(self) -> str:
        """The pass kind (what reports and messages call it)."""
        return self.kind

    def needs(self) -> dict[Need, str]:
        """{what this pass needs: why} for these spec settings; the pass manager checks them all
        before the first pass runs. Empty by default; the reason is shown in the error (may be "")."""
        return {}

    def check(self, program: Program, ctx: PassContext) -> None:
        """Raise PassError if the pass cannot apply to this program (before any work)."""

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        """Rewrite `program` (a fresh clone the pass may change) and say what changed in the result."""
        raise NotImplementedError
