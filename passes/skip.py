"""`skip`: remove whole residual blocks, or one residual branch of them, chosen by importance.

The rewrite is on the graph: each chosen region's residual input is routed to where its
output went, and the region becomes dead code (see `passes.skip_blocks`). Which regions go
is decided by a layer importance (`passes.importance.layer`) and a search:

- `oneshot`: score every candidate once on the calibration batches, remove the lowest;
- `greedy`: remove one region at a time, re-scoring the remaining candidates on the
  program with the previous removals applied (`fidelity_drop` is then measured against
  the original model's output, so the search minimises the total damage).

Calibration batches drive the scores; the held-back batches only measure the reported
fidelity after each removal (the trajectory).
"""
from __future__ import annotations

import fnmatch

from rewrite.errors import PassError
from rewrite.passmanager import Pass, PassContext, PassResult, register
from rewrite.program import Program

from .importance.layer import mean_output_cosine, score_regions
from .skip_blocks import ALIAS_NOTE, Candidates, Region, bypassed, find_regions, no_region_message, skip_regions


def _count(layers: int | float | list[str], n: int) -> int:
    if isinstance(layers, float):
        return max(1, int(round(layers * n)))
    return int(layers)


def _protected(r: Region, protect: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(r.key, p) or fnmatch.fnmatchcase(r.block, p) for p in protect)


@register
class SkipPass(Pass):
    kind = "skip"
    needs = frozenset({"calibration"})

    def _candidates(self, program: Program) -> Candidates:
        cands = find_regions(program, self.spec.granularity)
        if not cands.regions:
            raise PassError(no_region_message(program, cands))
        return cands

    def check(self, program: Program, ctx: PassContext) -> None:
        cands = self._candidates(program)
        free = [r for r in cands.regions if not _protected(r, self.spec.protect)]
        if isinstance(self.spec.layers, list):
            keys = {r.key for r in cands.regions}
            unknown = [k for k in self.spec.layers if not any(fnmatch.fnmatchcase(c, k) for c in keys)]
            if unknown:
                raise PassError(f"skip.layers names {unknown}, which are not skippable {self.spec.granularity} regions; "
                                f"candidates: {sorted(keys)}")
            return
        k = _count(self.spec.layers, len(free))
        if k > len(free):
            raise PassError(f"skip.layers asks to remove {k} {self.spec.granularity} regions but only {len(free)} are "
                            f"candidates ({len(cands.regions)} found, {len(cands.regions) - len(free)} protected by "
                            f"{self.spec.protect}); lower layers or protect fewer")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        spec = self.spec
        cands = self._candidates(program)
        calib = ctx.calibration.batches
        hold = ctx.calibration.holdout or calib
        free = [r for r in cands.regions if not _protected(r, spec.protect)]
        notes: list[str] = []
        if isinstance(spec.layers, list):
            chosen = [r for r in cands.regions if any(fnmatch.fnmatchcase(r.key, k) for k in spec.layers)]
            first = score_regions(program, chosen, calib, spec.importance, original=ctx.original)
            per_step = [first]
            steps = [(r, first[r.key]) for r in chosen]
            search = "explicit"
        else:
            k = _count(spec.layers, len(free))
            first = score_regions(program, free, calib, spec.importance, original=ctx.original)
            steps = []
            per_step: list[dict[str, float]] = [first]
            if spec.search == "oneshot":
                ranked = sorted(free, key=lambda r: first[r.key])
                steps = [(r, first[r.key]) for r in ranked[:k]]
            else:
                left = list(free)
                scores = first
                for i in range(k):
                    if i:
                        trial = bypassed(program, [r for r, _ in steps])
                        scores = score_regions(trial, left, calib, spec.importance, original=ctx.original)
                        per_step.append(scores)
                    best = min(left, key=lambda r: scores[r.key])
                    steps.append((best, scores[best.key]))
                    left.remove(best)
                if spec.importance == "outlier_fraction":
                    notes.append("outlier_fraction does not depend on activations: greedy re-scoring gives the one-shot order")
            search = spec.search
        trajectory = []
        for i in range(len(steps)):
            trial = bypassed(program, [r for r, _ in steps[: i + 1]])
            cos = mean_output_cosine(ctx.original, trial, hold)
            trajectory.append({"step": i + 1, "removed": steps[i][0].key, "score": round(steps[i][1], 6),
                               "holdout cosine": round(cos, 6), "holdout drop": round(1 - cos, 6)})
        order = {r.key: i + 1 for i, (r, _) in enumerate(steps)}
        table = []
        for r in cands.regions:
            row: dict = {"candidate": r.key}
            for i, sc in enumerate(per_step):  # greedy: the scores each step re-measured
                row[f"{spec.importance} (step {i + 1})" if len(per_step) > 1 else spec.importance] = (
                    round(sc[r.key], 6) if r.key in sc else "")
            row["protected"] = _protected(r, spec.protect)
            row["removed at step"] = order.get(r.key, "")
            table.append(row)
        removed_nodes = skip_regions(program, [r for r, _ in steps])
        program.notes.pop(ALIAS_NOTE, None)  # node names change at the next recapture
        program.notes.setdefault("skip", []).extend(
            {"removed": r.key, "granularity": spec.granularity, "importance": spec.importance, "score": s} for r, s in steps)
        if cands.rejected:
            notes.append("not candidates: " + "; ".join(f"{k} ({v})" for k, v in cands.rejected.items()))
        if spec.granularity == "block":
            notes.append("latency falls about in proportion to the blocks removed (whole matmuls disappear)")
        names = ", ".join(r.key for r, _ in steps)
        summary = f"removed {len(steps)} {spec.granularity} region(s) by {spec.importance} ({search}): {names}"
        details = {
            "candidates": table,
            "trajectory": trajectory,
            "removed": [r.key for r, _ in steps],
            "search": search,
            "importance": spec.importance,
            "granularity": spec.granularity,
            "nodes removed": removed_nodes,
        }
        return PassResult(program, summary=summary, details=details, notes=notes)
