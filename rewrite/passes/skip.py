"""`skip`: remove whole residual blocks, or one residual branch of them, chosen by importance.

The rewrite is on the graph: each chosen region's residual input is routed to where its
output went, and the region becomes dead code (see `passes.skip_blocks`). Which regions go
is decided by a layer importance (`passes.importance.layer`) and a search:

- `oneshot`: score every candidate once on the calibration batches, remove the lowest;
- `greedy`: remove one region at a time, re-scoring the remaining candidates on the
  program with the previous removals applied (`fidelity_drop` is then measured against
  the original model's output, so the search minimises the total damage);
- `beam`: greedy that keeps the `beam_width` best partial sets at every step instead of one
  (greedy is beam width 1). Removals interact: on all-MiniLM-L6-v2 the best single block
  (L2) is not in the best pair (L1, L3), which greedy cannot reach and beam width 4 finds.

A set's objective is its `fidelity_drop` or `next_token_nll` (each already measured against the
original with the whole set removed), or for the other kinds the sum of the step scores.

Calibration batches drive the scores; the held-back batches only measure the reported
fidelity after each removal (the trajectory).
"""
from __future__ import annotations

import fnmatch
from typing import Annotated, Callable, Literal, Union

from rewrite.errors import PassError
from pydantic import Field
from rewrite.pass_base import Need, Pass, PassContext, PassResult, register
from rewrite.program import Program
from rewrite.progress import bar
from rewrite.passes.importance import LayerImportance
from rewrite.spec import StrictModel

from .importance.layer import mean_output_cosine, score_regions
from .skip_compensate import replace_with_linear
from .skip_blocks import ALIAS_NOTE, Candidates, Region, bypassed, find_regions, no_region_message, skip_regions


def _count(layers: int | float | list[str], n: int) -> int:
    if isinstance(layers, float):
        return max(1, int(round(layers * n)))
    return int(layers)


def _protected(r: Region, protect: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(r.key, p) or fnmatch.fnmatchcase(r.block, p) for p in protect)


CUMULATIVE = ("fidelity_drop", "next_token_nll")
"""Layer kinds whose score after earlier removals already measures the whole set against the original."""

Scorer = Callable[[list[Region], list[Region]], dict[str, float]]


def beam_search(free: list[Region], k: int, score: Scorer, *, width: int,
                cumulative: bool) -> tuple[list[tuple[Region, float]], list[dict[str, float]]]:
    """Choose k regions to remove, keeping the `width` best partial sets at each step.

    `score(removed, left)` scores each region in `left` given that `removed` are already
    gone; lower is better. A set's objective is the score of its last region when scores are
    `cumulative` (each already measures the whole set), else the sum of its step scores.
    Returns the best set as (region, step score) in removal order, and the score dicts
    measured along its path (one per step, for the report). Width 1 is greedy.
    """
    beams: list[tuple[list[tuple[Region, float]], float, list[dict[str, float]]]] = [([], 0.0, [])]
    search = "greedy" if width == 1 else f"beam width {width}"
    for _ in bar(range(k), desc=f"skip: {search} search", unit="removal"):
        expanded: dict[frozenset[str], tuple[list[tuple[Region, float]], float, list[dict[str, float]]]] = {}
        for steps, objective, history in beams:
            removed = [r for r, _ in steps]
            left = [r for r in free if r not in removed]
            scores = score(removed, left)
            for r in left:
                path = steps + [(r, scores[r.key])]
                total = scores[r.key] if cumulative else objective + scores[r.key]
                key = frozenset(x.key for x, _ in path)
                if key not in expanded or total < expanded[key][1]:
                    expanded[key] = (path, total, history + [scores])
        beams = sorted(expanded.values(), key=lambda b: b[1])[:width]
    best_path, _, best_history = beams[0]
    return best_path, best_history


def _drop_cache_entries(program: Program, removed: list[Region]) -> str:
    """On a generation graph: the removed regions' KV-cache entries leave the interface."""
    from rewrite.cache_entries import dead_entries, drop_cache_entries
    from rewrite.generation import NOTES_KEY

    if not program.notes.get(NOTES_KEY):
        return ""
    layers = dead_entries(program, {n for r in removed for n in r.nodes})
    if not layers:
        return ""
    layout = drop_cache_entries(program, layers)
    mapping = ", ".join(f"{i}<-{src}" for i, src in enumerate(layout.source_layers()))
    return (f"KV cache: the entries of model layers {layers} left the interface; {layout.num_layers} remain, numbered "
            f"0..{layout.num_layers - 1} in the export (entry<-model layer: {mapping})")


# --------------------------------------------------------------------------- spec
class SkipSpec(StrictModel):
    """Remove whole blocks, or one residual branch of them, by importance."""

    kind: Literal["skip"] = "skip"
    layers: Union[Annotated[int, Field(ge=1)], Annotated[float, Field(gt=0.0, lt=1.0)], list[str]] = 1
    granularity: Literal["block", "attention", "mlp"] = "block"
    importance: LayerImportance = "fidelity_drop"
    search: Literal["oneshot", "greedy", "beam"] = "beam"
    """oneshot: rank once; greedy: remove one at a time, re-scoring; beam: greedy that keeps the
    `beam_width` best partial sets at each step (finds pairs greedy misses)."""
    beam_width: Annotated[int, Field(ge=1, le=64)] = 4
    protect: list[str] = []
    compensate: Literal["none", "linear"] = "none"
    """none: route each removed region's input to its output's users. linear: replace it by x + x M + b,
    fitted by least squares to the region's output on calibration batches (ridge cross-validated, kept only
    where it beats plain removal on held-back batches; `passes.skip_compensate`). Adds d x (d + 1)
    parameters and one d x d matmul per token for each map kept. The search still scores plain removals
    (`benchmarks/llm_blocks.stand_in_greedy` is a search that scores candidates with their stand-ins)."""


@register
class SkipPass(Pass):
    spec_class = SkipSpec
    def needs(self) -> dict[Need, str]:
        """Calibration: blocks are ranked by what removing them does on calibration batches."""
        return {Need.CALIBRATION: ""}

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
                width = 1 if spec.search == "greedy" else spec.beam_width

                def score(removed: list[Region], left: list[Region]) -> dict[str, float]:
                    if not removed:
                        return first
                    return score_regions(bypassed(program, removed), left, calib, spec.importance, original=ctx.original)

                steps, per_step = beam_search(free, k, score, width=width, cumulative=spec.importance in CUMULATIVE)
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
        stand_ins: list[dict] = []
        if spec.compensate == "linear":
            stand_ins, comp_notes, removed_nodes = replace_with_linear(program, [r for r, _ in steps], calib, hold)
            notes.extend(comp_notes)
            compensated_cosine = round(mean_output_cosine(ctx.original, program, hold), 6)
        else:
            removed_nodes = skip_regions(program, [r for r, _ in steps])
        cache_note = _drop_cache_entries(program, [r for r, _ in steps])
        if cache_note:
            notes.append(cache_note)
        program.notes.pop(ALIAS_NOTE, None)  # node names change at the next recapture
        program.notes.setdefault("skip", []).extend(
            {"removed": r.key, "granularity": spec.granularity, "importance": spec.importance, "score": s} for r, s in steps)
        if cands.rejected:
            notes.append("not candidates: " + "; ".join(f"{k} ({v})" for k, v in cands.rejected.items()))
        if spec.granularity == "block":
            notes.append("latency falls about in proportion to the blocks removed (whole matmuls disappear)"
                         + ("; each linear stand-in costs one d x d matmul per token" if stand_ins else ""))
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
        if spec.compensate == "linear":
            details["stand-ins"] = stand_ins
            details["holdout cosine with stand-ins"] = compensated_cosine
        return PassResult(program, summary=summary, details=details, notes=notes)
