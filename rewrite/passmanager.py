"""The pass manager: order checks, calibration once, and measurement after every pass.

A pass is a class with a `kind` (the spec's discriminator), what it `needs`
("calibration", "gradients"), the graph properties it `requires_absent` (with a reason) and
the properties it `establishes`. The manager refuses an impossible order before any work,
then runs each pass and, after it: recaptures the graph (lint + fresh shapes), measures
cost and fidelity on held-back batches, and appends a `PassRecord` to the report.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel

from .calibration import CalibrationData
from .errors import PassError, VerificationError
from .measure import cost, fidelity
from .program import Program
from .progress import stage
from .report import PassRecord
from .spec import Spec

log = logging.getLogger("rewrite")

_REGISTRY: dict[str, type["Pass"]] = {}


def register(cls: type["Pass"]) -> type["Pass"]:
    """Class decorator: make a pass available under its spec `kind`."""
    _REGISTRY[cls.kind] = cls
    return cls


def pass_for(spec: BaseModel) -> "Pass":
    import passes  # noqa: F401  (registers the built-in passes)

    kind = getattr(spec, "kind")
    if kind not in _REGISTRY:
        raise PassError(f"no pass is registered for kind {kind!r}; known kinds: {sorted(_REGISTRY)}")
    return _REGISTRY[kind](spec)


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
        raise NotImplementedError


def check_order(passes: list[Pass]) -> None:
    """Reject an order in which a pass follows one that makes it impossible."""
    state: dict[str, int] = {}
    written: set[str] = set()
    for i, p in enumerate(passes):
        missing = set(p.reads) - written
        if missing:
            raise PassError(
                f"passes[{i}] ({p.kind}) reads {sorted(missing)}, which no earlier pass writes; "
                "add the pass that computes it before this one"
            )
        written |= set(p.writes)
        for prop, why in p.requires_absent.items():
            if prop in state:
                j = state[prop]
                raise PassError(
                    f"passes[{i}] ({p.kind}) cannot run after passes[{j}] ({passes[j].kind}): {why}. "
                    f"Move the {p.kind} pass before the {passes[j].kind} pass."
                )
        for prop in p.establishes:
            state.setdefault(prop, i)


def _describe(p: "Pass") -> str:
    """`prune (granularity=head)`: the kind and the field that tells passes of one kind apart."""
    for field_name in ("granularity", "method"):
        value = getattr(p.spec, field_name, None)
        if isinstance(value, str):
            return f"{p.kind} ({field_name}={value})"
    return p.kind


def run_passes(program: Program, ctx: PassContext, passes: list[Pass], records: list[PassRecord], warnings: list[str]) -> Program:
    """Run every pass in order; measure after each one."""
    from passes.canonicalize import canonicalize  # the pipeline canonicalises after every recapture

    check_order(passes)
    for p in passes:
        if "calibration" in p.needs:
            ctx.calibration.require(f"the {p.kind} pass")
    for i, p in enumerate(passes):
        ctx.index = i
        with stage(f"pass {i + 1}/{len(passes)}: {_describe(p)}"):
            p.check(program, ctx)
            start = time.perf_counter()
            result = p.run(program, ctx)
            program = result.program
            program.finalize()
            program = program.recapture()
            canonicalize(program)
            seconds = time.perf_counter() - start
            ctx.state |= set(p.establishes)
            if not p.preserves_stats:
                ctx.cache.clear()
            fid = fidelity(ctx.original, program, ctx.calibration.holdout)
            seen = list(ctx.calibration.batches)[: max(2, len(ctx.calibration.holdout))]  # what the fits saw
            fid_cal = None if ctx.calibration.from_example else fidelity(ctx.original, program, seen)
        if fid is not None and fid.cosine_drop > ctx.spec.verify.max_cosine_drop:
            msg = (f"pass {i} ({p.kind}) lowered output cosine to {fid.cosine:.4f} "
                   f"(drop {fid.cosine_drop:.4f} > verify.max_cosine_drop {ctx.spec.verify.max_cosine_drop})")
            if ctx.spec.verify.fail_on_fidelity:
                raise VerificationError(msg)
            warnings.append(msg)
            log.warning(msg)
        records.append(PassRecord(
            name=f"{i}:{p.name}", kind=p.kind, seconds=seconds, cost=cost(program), fidelity=fid, fidelity_calibration=fid_cal,
            summary=result.summary, details=result.details, notes=result.notes,
        ))
        log.info("pass %s done in %.1fs", p.name, seconds)
    return program
