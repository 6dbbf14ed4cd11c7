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

from pydantic import BaseModel

import rewrite.passes  # noqa: F401  (registers every pass kind and its spec: Spec's union is built from them)

from .errors import PassError, VerificationError
from .measure import cost, fidelity
from .pass_base import REGISTRY, Need, Pass, PassContext, PassResult, register  # noqa: F401  (re-exported)
from .program import Program
from .progress import stage
from .report import PassRecord
from .spec import Spec

log = logging.getLogger("rewrite")

def pass_for(spec: BaseModel) -> "Pass":
    kind = getattr(spec, "kind")
    if kind not in REGISTRY:
        raise PassError(f"no pass is registered for kind {kind!r}; known kinds: {sorted(REGISTRY)}")
    return REGISTRY[kind](spec)


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


def check_needs(passes: list[Pass], calibration) -> None:
    """Before any work: raise the first unmet need (`Pass.needs`), naming the pass and why."""
    for p in passes:
        for need, why in p.needs().items():
            if need is Need.CALIBRATION:
                calibration.require(f"the {p.kind} pass ({why})" if why else f"the {p.kind} pass")


def run_passes(program: Program, ctx: PassContext, passes: list[Pass], records: list[PassRecord], warnings: list[str]) -> Program:
    """Run every pass in order; measure after each one."""
    from rewrite.passes.canonicalize import canonicalize  # the pipeline canonicalises after every recapture

    check_order(passes)
    check_needs(passes, ctx.calibration)
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
