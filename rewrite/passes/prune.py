"""`prune`: remove coupled groups so the model physically shrinks, or mask weights.

Structured granularities (`channel`, `neuron`, `head`) work on the groups of
`rewrite.dims`: every unit removed takes its slices out of every member parameter
(producer rows, norm parameters, consumer columns) through `Program.set_param`; the
constant shape arguments that canonicalisation cannot derive (split sizes, depthwise conv
`groups`, layer-norm shapes) are rewritten from the kept sizes of the dimension graph;
the pass manager then recaptures, and canonical views follow the new widths. With
`compensate`, the consuming layers are refit on calibration data before slicing
(`passes.prune_compensate`). `unstructured` and `n:m` only zero weights
(`passes.prune_sparse`).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
import torch

from rewrite.cache_entries import narrow_cache_heads
from rewrite.dims import analyse, removed_masks
from rewrite.errors import PassError
from rewrite.measure import count_flops
from rewrite.pass_base import Need, Pass, PassContext, PassResult, Property, register
from rewrite.program import Program
from rewrite.passes.importance import WeightImportance
from rewrite.spec import StrictModel

from .prune_compensate import DEFAULT_CV_FOLDS, DEFAULT_SHRINKAGE_GRID
from .prune_shapes import patch_shape_constants
from .prune_plan import (DEFAULT_ALLOCATION, DEFAULT_COMPENSATE, DEFAULT_IMPORTANCE, allocate_global, allocate_uniform, candidates, counts_from_curves,
                         op_positions, rounding_notes, uniform_counts, unit_flops, unit_scores)

aten = torch.ops.aten
OBS_FALLBACK = "wanda"
"""The importance a default `obs` falls back to where OBS cannot run (with the default compensation)."""
SPARSE_NOTE = ("unstructured and N:M pruning only zero weights: the model keeps its size and ONNX Runtime runs it "
               "at the same speed (dense kernels); the zeros pay off only when stored sparse or run by a sparse "
               "(e.g. 2:4 tensor-core) kernel")


def refit_reference(program: Program, ctx: PassContext) -> Program | None:
    """The program whose outputs the sequential refit aims at: the original, while the program
    still has all of its blocks and tokens; else None (the program as this pass finds it).

    After a skip or token pass the original's outputs are out of reach: aiming at them makes one
    kept layer try to stand in for a removed block (all-MiniLM-L6-v2, deploy spec: STS-B 81.3
    aiming at the original after skipping two blocks, against 83.6 with the one-shot refit).
    """
    if Property.TOKENS_PRUNED in ctx.state or len(program.blocks()) != len(ctx.original.blocks()):
        return None
    return ctx.original


# --------------------------------------------------------------------------- spec
class PruneBudget(StrictModel):
    """Fraction of the whole model's params or FLOPs to keep."""

    params: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    flops: Annotated[float | None, Field(gt=0.0, le=1.0)] = None

    @model_validator(mode="after")
    def _one(self) -> "PruneBudget":
        if (self.params is None) == (self.flops is None):
            raise ValueError("give exactly one of params, flops")
        return self


class PruneSpec(StrictModel):
    """Remove coupled groups (structured) or mask weights (unstructured, N:M)."""

    kind: Literal["prune"] = "prune"
    granularity: Literal["channel", "neuron", "head", "unstructured", "n:m"]
    amount: Annotated[float | None, Field(ge=0.0, lt=1.0)] = None
    """Fraction removed within scope."""
    budget: PruneBudget | None = None
    importance: WeightImportance | Literal["obs"] | None = None
    """Defaults per granularity: wanda for neuron/head/unstructured/n:m, magnitude for channel.
    `obs` (heads and neurons read by a linear layer): structured Optimal Brain Surgeon, each layer
    drops the units its least-squares refit recovers best (implies compensate: lstsq)."""
    scope: list[str] | None = None
    """Module globs; default: everything prunable except embeddings, output head and residual width."""
    exclude: list[str] = []
    allocation: Literal["uniform", "global"] | None = None
    """None: the granularity's default (passes/prune_plan.py, chosen on held-out train data)."""
    max_per_layer: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.9
    """Cap on the fraction removed from one layer under global allocation."""
    round_to: Annotated[int, Field(ge=1)] = 1
    reduce: Literal["sum", "mean", "max"] = "sum"
    normalize: bool = True
    """Normalise group scores per layer before a global ranking."""
    compensate: Literal[False, True, "bias", "lstsq"] | None = None
    """None: the granularity's default (passes/prune_plan.py, chosen on held-out train data)."""
    lstsq: Literal["sequential", "oneshot"] = "sequential"
    """How `compensate: lstsq` refits: "sequential" (layer by layer on the current program, towards the
    original's outputs; `prune_compensate.compensate_sequential`) or "oneshot" (all consumers at once from
    statistics of the unpruned program; `prune_compensate.compensate`)."""
    ridge: Annotated[float, Field(gt=0.0)] = 1e-2
    """Ridge of the least-squares refits (and OBS's curves), relative to the mean diagonal of the input
    second moment. (MiniLM 50%: 0.01 -> drop 2.88, 0.1 -> 2.57, 0.3 -> 3.30; 0.1 loses to the one-shot
    refit on the gpt2 zoo model, so 0.01 is the default.)"""
    refit_folds: Annotated[int, Field(ge=2)] = DEFAULT_CV_FOLDS
    """Sequential lstsq / obs refits: calibration batches are dealt round-robin into this many folds, and
    each refit's shrinkage towards the unfitted weights is chosen by cross-validation over them (fewer
    batches than folds: one fold per batch; one batch: a data-size rule instead)."""
    refit_shrinkage: Annotated[list[Annotated[float, Field(gt=0.0)]], Field(min_length=1)] = list(DEFAULT_SHRINKAGE_GRID)
    """The shrinkage strengths the cross-validation tries, relative to the mean diagonal of the input second
    moment; keeping the unfitted weights (infinite shrinkage) is always a candidate too."""
    n: Annotated[int | None, Field(ge=1)] = None
    m: Annotated[int | None, Field(ge=2)] = None

    @model_validator(mode="after")
    def _check(self) -> "PruneSpec":
        if self.granularity == "n:m":
            if self.n is None or self.m is None:
                raise ValueError("granularity 'n:m' needs n and m (e.g. n: 2, m: 4)")
            if self.n >= self.m:
                raise ValueError(f"n ({self.n}) must be smaller than m ({self.m})")
        elif (self.amount is None) == (self.budget is None):
            raise ValueError("give exactly one of amount (a fraction) or budget (params or flops)")
        if self.importance == "obs":
            if self.granularity not in ("head", "neuron"):
                raise ValueError("importance 'obs' chooses heads or neurons by refitting the linear layer that reads "
                                 f"them; granularity {self.granularity!r} needs another importance (e.g. wanda)")
            if self.compensate not in (None, False, "lstsq"):
                raise ValueError("importance 'obs' refits by least squares; use compensate: lstsq (or leave it out)")
        return self


@register
class PrunePass(Pass):
    spec_class = PruneSpec
    requires_absent = {Property.QUANTIZED: "pruning edits float weights, which quantization has packed",
                       Property.TOKENS_PRUNED: "token pruning inserts data-dependent shapes that weight pruning does not track"}
    establishes = frozenset({Property.PRUNED})

    spec: PruneSpec

    @property
    def importance(self) -> str:
        """The spec's importance, or the granularity's default (`prune_plan.DEFAULT_IMPORTANCE`); a default
        `obs` falls back to wanda where OBS cannot run (a params/FLOPs budget, or units not read by exactly
        one linear layer: `_obs_readers`), and the report says so."""
        if self.spec.importance:
            return self.spec.importance
        default = DEFAULT_IMPORTANCE[self.spec.granularity]
        if default == "obs" and (self.spec.budget is not None or getattr(self, "_obs_fallback", None)):
            return OBS_FALLBACK
        return default

    @property
    def compensate(self) -> Any:
        """The spec's compensation, or the granularity's default (`prune_plan.DEFAULT_COMPENSATE`)."""
        c = self.spec.compensate
        return DEFAULT_COMPENSATE[self.spec.granularity] if c is None else c

    @property
    def allocation(self) -> str:
        """The spec's allocation, or the granularity's default (`prune_plan.DEFAULT_ALLOCATION`)."""
        return self.spec.allocation or DEFAULT_ALLOCATION.get((self.spec.granularity, self.importance), "uniform")

    def needs(self) -> dict[Need, str]:
        """Calibration, unless the importance is data-free and no compensation was asked for: a
        defaulted refit is then skipped without data (and the report says so), not required."""
        data_free = self.importance in ("magnitude", "magnitude_l1", "magnitude_l2")
        data = not data_free or (self.spec.compensate if self.spec.compensate is not None else False)
        return {Need.CALIBRATION: ""} if data else {}

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if self.spec.granularity in ("unstructured", "n:m"):
            return self._sparse(program, ctx)
        return self._structured(program, ctx)

    # ------------------------------------------------------------------ structured
    def _structured(self, program: Program, ctx: PassContext) -> PassResult:
        s = self.spec
        dg, groups = analyse(program)
        cands = candidates(groups, s.granularity, s.scope, s.exclude)
        notes: list[str] = []
        if not cands:
            raise PassError(_nothing_to_prune(groups, s.granularity, s.scope, s.exclude))
        batches = list(ctx.calibration.batches)
        self._obs_fallback = None
        if self.importance == "obs":
            readers = _obs_readers(program, cands)
            if isinstance(readers, tuple):
                return self._obs(program, ctx, dg, groups, cands, batches, readers)
            if self.spec.importance == "obs":
                raise PassError(readers)
            self._obs_fallback = readers
            notes.append(f"default importance obs does not apply ({readers.split('; use')[0]}): "
                         f"importance {OBS_FALLBACK} used instead")
        elif self.spec.importance is None and DEFAULT_IMPORTANCE[s.granularity] == "obs":
            notes.append(f"default importance obs takes no params/FLOPs budget: importance {OBS_FALLBACK} used instead")
        scores, snotes = unit_scores(program, cands, self.importance, batches, reduce=s.reduce, normalize=s.normalize,
                                     cache=ctx.cache, task_loss=ctx.task_loss, original=ctx.original)
        notes += snotes
        missing = [g for g in cands if g.id not in scores]
        if missing:
            notes.append(f"{len(missing)} groups had no {self.importance} scores and were left whole")
            cands = [g for g in cands if g.id in scores]
            if not cands:
                raise PassError(f"prune: importance {self.importance} has no scores for any of the {len(missing)} "
                                f"prunable {s.granularity} groups (their producers, e.g. {', '.join(missing[0].ops[:2])}, "
                                "are ops the importance statistics do not read: they read linear, conv and "
                                "matmul weights); nothing was pruned")
        positions = op_positions(program)
        before_params = sum(t.numel() for t in program.params().values() if t.is_floating_point())
        before_flops = count_flops(program)
        if s.budget is not None or self.allocation == "global":
            if s.budget is not None and s.budget.params is not None:
                cost = {g.id: float(g.params_per_unit(program)) for g in cands}
                target = before_params * (1.0 - s.budget.params)
            elif s.budget is not None:
                cost = {g.id: unit_flops(program, g, positions) for g in cands}
                target = before_flops * (1.0 - s.budget.flops)
            else:
                cost = {g.id: 1.0 for g in cands}
                target = s.amount * sum(g.size for g in cands)
            removed = allocate_global(cands, scores, cost, target, s.max_per_layer, s.round_to)
        else:
            removed = allocate_uniform(cands, scores, s.amount, s.round_to)
            notes += rounding_notes(cands, s.amount, uniform_counts(cands, s.amount, s.round_to))
        removed = {gid: us for gid, us in removed.items() if us}
        if not removed:
            raise _removes_nothing(s, cands, self.allocation)
        removal = _removal(cands, removed)
        comp_rows: list[dict[str, Any]] = []
        comp = self.compensate
        if comp and self.spec.compensate is None and ctx.calibration.from_example:
            comp = False
            notes.append(f"no calibration data: the default {DEFAULT_COMPENSATE[s.granularity]} refit was skipped "
                         "(pass calibration data to refit the consumers of the removed units)")
        if comp and removal:
            from .prune_compensate import compensate, compensate_sequential

            entry = program.clone()
            if comp == "lstsq" and s.lstsq == "sequential":
                comp_rows, cnotes = compensate_sequential(program, removal, batches, reference=refit_reference(program, ctx),
                                                          ridge=self.spec.ridge, **self._refit_cv())
            else:
                mode = "lstsq" if comp == "lstsq" else "bias"
                comp_rows, cnotes = compensate(program, removal, batches, mode)
            notes += cnotes
            program, removal = self._keep_better(program, entry, removal, comp_rows, notes, ctx,
                                                 f"{comp if comp is not True else 'bias'} compensation")
        return self._apply(program, dg, groups, cands, scores, removed, removal, comp_rows, notes,
                           positions, before_params, before_flops)

    def _refit_cv(self) -> dict[str, Any]:
        """How the sequential refits cross-validate their shrinkage (`compensate_sequential` keywords)."""
        return {"cv_folds": self.spec.refit_folds, "shrinkage": tuple(self.spec.refit_shrinkage)}

    def _obs(self, program: Program, ctx: PassContext, dg, groups, cands, batches, readers) -> PassResult:
        """importance `obs`: the sequential least-squares refit picks the removed units itself,
        layer by layer (`prune_compensate.obs_select`), so each layer loses what its refit recovers best."""
        from .prune_compensate import compensate_sequential, obs_curves

        s = self.spec
        if s.budget is not None:
            raise PassError("prune: importance 'obs' chooses units layer by layer while refitting, so it takes "
                            "`amount` (uniform or global); use wanda or hessian for a params or FLOPs budget")
        positions = op_positions(program)
        before_params = sum(t.numel() for t in program.params().values() if t.is_floating_point())
        before_flops = count_flops(program)
        select, removal = readers
        notes: list[str] = []
        if self.allocation == "global":
            curves = obs_curves(program, removal, select, batches, self.spec.ridge)
            counts = counts_from_curves(cands, {sel.group: curves[p] for p, sel in select.items()}, s.amount,
                                        s.max_per_layer, s.round_to)
            notes.append("obs global allocation, units removed per layer: "
                         + ", ".join(f"{g.layer or g.id}: {counts[g.id]}" for g in cands))
        else:
            counts = uniform_counts(cands, s.amount, s.round_to)
            notes += rounding_notes(cands, s.amount, counts)
        if not any(counts.values()):
            raise _removes_nothing(s, cands, self.allocation)
        for sel in select.values():
            sel.remove = counts[sel.group]
        entry = program.clone()
        comp_rows, cnotes = compensate_sequential(program, removal, batches, reference=refit_reference(program, ctx),
                                                  ridge=self.spec.ridge, select=select, **self._refit_cv())
        notes += cnotes
        program, removal = self._keep_better(program, entry, removal, comp_rows, notes, ctx, "the obs refit")
        removed = {sel.group: sorted(sel.removed) for sel in select.values() if sel.removed}
        # the report's scores: the error increase of each unit's removal (higher = keep)
        scores = {sel.group: sel.cost.float() for sel in select.values()}
        for key, gone in _removal(cands, removed).items():  # keeps the keys of biases the refit added
            removal[key] |= gone
        return self._apply(program, dg, groups, cands, scores, removed, removal, comp_rows, notes,
                           positions, before_params, before_flops)

    def _keep_better(self, fitted: Program, unfitted: Program, removal: dict[tuple[str, int], set[int]],
                     comp_rows: list[dict[str, Any]], notes: list[str], ctx: PassContext, what: str
                     ) -> tuple[Program, dict[tuple[str, int], set[int]]]:
        """Fitting is checked, not trusted: the refit program and the program as the pass found it, both
        with the same inputs removed, are compared on the held-back calibration batches (per-token output
        cosine to the original, padding excluded); the better one is kept (in `fitted`, the program the
        pass analysed, restored in place when the fit loses) and the report says which."""
        from .importance.layer import mean_output_cosine
        from .prune_compensate import consumers_zeroed, restore_unfitted

        holdout = list(ctx.calibration.holdout)
        if ctx.calibration.from_example or not holdout or any(h is b for h in holdout for b in ctx.calibration.batches):
            notes.append(f"{what}: no held-back batches, so the fit was not checked")
            return fitted, removal
        kept = defaultdict(set, {k: v for k, v in removal.items() if k[0] in unfitted.params()})
        fit = mean_output_cosine(ctx.original, consumers_zeroed(fitted, removal), holdout)
        raw = mean_output_cosine(ctx.original, consumers_zeroed(unfitted, kept), holdout)
        check = {"held-back cosine, fitted": round(fit, 6), "held-back cosine, unfitted": round(raw, 6)}
        if raw > fit:
            notes.append(f"{what} lost on the held-back batches (cosine {fit:.5f} fitted vs {raw:.5f} unfitted): "
                         "the unfitted weights are kept")
            for r in comp_rows:
                r["kept"] = "unfitted (fit lost on held-back batches)"
            self._fit_check = {"kept": "unfitted", **check}
            restore_unfitted(fitted, unfitted)
            return fitted, kept
        notes.append(f"{what} checked on the held-back batches: cosine {fit:.5f} fitted vs {raw:.5f} unfitted (fit kept)")
        self._fit_check = {"kept": "fitted", **check}
        return fitted, removal

    def _apply(self, program: Program, dg, groups, cands, scores, removed, removal, comp_rows, notes,
               positions, before_params, before_flops) -> PassResult:
        """Slice every member, rewrite shape constants, and report."""
        s = self.spec
        by_id = {g.id: g for g in cands}
        removed_labels = [by_id[gid].labels[u] for gid, us in removed.items() for u in us]
        removed_idx = removed_masks(dg, removed_labels)
        for target in sorted({p for p, _ in removal}):
            t = program.param(target)
            for (p, dim), gone in removal.items():
                if p != target:
                    continue
                keep = torch.tensor([i for i in range(t.shape[dim]) if i not in gone], dtype=torch.long)
                t = t.index_select(dim, keep)
            program.set_param(target, t.contiguous())
        patched, unpatchable = patch_shape_constants(program, removed_idx)
        if unpatchable:
            raise PassError(f"prune: a shape constant cannot follow the pruned widths: {unpatchable[0]}; "
                            "prune another granularity or exclude that layer (scope/exclude)")
        notes = notes + narrow_cache_heads(program, removed_idx)  # a generation graph's KV cache follows its heads
        rows = self._rows(program, cands, scores, removed, positions)
        after_params = sum(t.numel() for t in program.params().values() if t.is_floating_point())
        after_flops = count_flops(program)
        units = sum(len(u) for u in removed.values())
        details: dict[str, Any] = {
            "importance": self.importance,
            "allocation": "budget" if s.budget is not None else self.allocation,
            "params before": before_params, "params after": after_params,
            "FLOPs before": before_flops, "FLOPs after": after_flops,
            "groups": rows,
        }
        if patched:
            details["shape constants rewritten"] = patched
        if comp_rows:
            details["compensation"] = comp_rows
        if getattr(self, "_fit_check", None):
            details["fit check (held-back batches)"] = self._fit_check
        frozen = [{"group": g.id, "kind": g.kind, "layer": g.layer or "", "units": g.size, "reason": g.reason}
                  for g in groups if not g.prunable]
        if frozen:
            details["not prunable"] = frozen
        summary = (f"removed {units} {s.granularity} units in {len(removed)} groups; params {before_params} -> {after_params} "
                   f"({after_params / max(before_params, 1):.2%}), FLOPs {before_flops} -> {after_flops} "
                   f"({after_flops / max(before_flops, 1):.2%})")
        return PassResult(program, summary=summary, details=details, notes=notes)

    def _rows(self, program: Program, cands, scores, removed, positions) -> list[dict[str, Any]]:
        rows = []
        for g in cands:
            gone = removed.get(g.id, [])
            v = scores[g.id]
            kept = [u for u in range(g.size) if u not in set(gone)]
            rows.append({
                "group": g.id, "kind": g.kind, "layer": g.layer or ",".join(g.ops[:2]), "units": g.size,
                "removed": len(gone), "removed units": ",".join(map(str, gone[:16])) + ("..." if len(gone) > 16 else ""),
                "max removed score": round(float(v[gone].max()), 4) if gone else None,
                "min kept score": round(float(v[kept].min()), 4) if kept else None,
                "params removed": g.params_per_unit(program) * len(gone) if gone else 0,
                "FLOPs removed (est.)": int(unit_flops(program, g, positions) * len(gone)),
            })
        return rows

    # ------------------------------------------------------------------ unstructured / N:M
    def _sparse(self, program: Program, ctx: PassContext) -> PassResult:
        from .prune_sparse import apply_masks, weight_targets

        s = self.spec
        _, groups = analyse(program)
        protected = set() if s.scope else {m.param for g in groups if not g.prunable and g.reason == "model output"
                                           and g.layer is None for m in g.producers}
        targets = weight_targets(program, s.scope, s.exclude, protected)
        if not targets:
            raise PassError("prune: no linear/conv weights in scope; widen `scope` or check `exclude`")
        notes = [SPARSE_NOTE]
        try:
            from rewrite.passes.importance.weight import weight_scores

            scores = weight_scores(program, list(ctx.calibration.batches), self.importance, params=[t for t, _ in targets],
                                   cache=ctx.cache, task_loss=ctx.task_loss, original=ctx.original)
        except ImportError:
            notes.append(f"rewrite.passes.importance is not available: importance {self.importance!r} replaced by |w|")
            scores = {}
        amount = s.amount
        if s.granularity == "unstructured" and s.budget is not None:
            amount = 1.0 - (s.budget.params or s.budget.flops)
            notes.append("a budget for unstructured pruning is read as the fraction of weights kept (zeros are still stored)")
        rows, mnotes = apply_masks(program, targets, scores, s.granularity, amount, s.n, s.m)
        notes += mnotes
        total = sum(r["zeroed"] for r in rows)
        what = f"{s.n}:{s.m}" if s.granularity == "n:m" else f"{amount:.0%} unstructured"
        return PassResult(program, summary=f"{what} masks on {len(rows)} weights ({total} zeros); size and latency unchanged",
                          details={"importance": self.importance, "weights": rows}, notes=notes)


def _removes_nothing(s: Any, cands: list, allocation: str) -> PassError:
    """The error for an amount that removes no unit: a pass that changes nothing must say so."""
    fix = "raise amount" + ("" if allocation == "global" else " or use allocation: global")
    return PassError(f"prune: amount {s.amount if s.budget is None else s.budget} removes no {s.granularity} unit: "
                     f"the {len(cands)} prunable groups have {min(g.size for g in cands)}-{max(g.size for g in cands)} "
                     f"units each and the count per group rounds to 0 ({allocation} allocation); {fix}")


def _obs_readers(program: Program, cands) -> tuple[dict, dict] | str:
    """OBS's per-layer selections (linear weight -> UnitSelection, removal skeleton), or why OBS cannot run:
    it needs every group to be read by exactly one linear layer, one group per layer."""
    from .prune_compensate import UnitSelection, consumer_ops

    removal: dict[tuple[str, int], set[int]] = defaultdict(set)
    readers = [m for g in cands for m in g.consumers]
    reads = Counter((op.param, op.in_dim) for op in consumer_ops(program, {(m.param, m.dim) for m in readers})
                    if op.kind != "conv")
    select: dict[str, Any] = {}
    for g in cands:
        m = g.consumers[0] if len(g.consumers) == 1 else None
        if m is not None and reads[(m.param, m.dim)] > 1:  # one weight in several layers (ALBERT's shared blocks)
            return (f"prune: importance 'obs' refits each layer's own weight; {m.module}'s weight is shared by "
                    f"{reads[(m.param, m.dim)]} layers (group {g.id}); use importance wanda for it")
        if m is None or (m.param, m.dim) not in reads or m.param in select:
            return (f"prune: importance 'obs' needs every group to be read by exactly one linear layer; "
                    f"group {g.id} ({g.kind}, {g.layer or ','.join(g.ops[:2])}) is read by "
                    f"{[c.module for c in g.consumers] or 'no linear layer'}; use importance wanda for it")
        select[m.param] = UnitSelection(g.id, m.indices.long(), 0)
        removal[(m.param, m.dim)] = set()
    return select, removal


def _nothing_to_prune(groups, granularity: str, scope, exclude) -> str:
    """Why no group of this granularity can be pruned, and which granularity would work."""
    from .prune_plan import GRANULARITY_KINDS

    kinds = GRANULARITY_KINDS[granularity]
    own = [g for g in groups if g.kind in kinds]
    other = sorted({g.kind for g in groups if g.prunable and g.size >= 2 and g.kind not in kinds})
    alt = sorted({gran for gran, ks in GRANULARITY_KINDS.items() if set(ks) & set(other)} - {granularity})
    hint = f"granularity {' or '.join(alt)} has prunable groups" if alt else "this model has no prunable groups at any granularity"
    if not own:
        what = {"head": "attention heads (no scaled-dot-product or softmax attention whose heads dimension tracking follows)",
                "neuron": "FFN neurons (no hidden layer between two linear layers)",
                "channel": "channels or neurons"}[granularity]
        return f"prune: this model has no {what}; {hint}"
    frozen = [g for g in own if not g.prunable]
    if frozen:
        why = "; ".join(sorted({g.reason for g in frozen})[:3])
        in_scope = "" if not (scope or exclude) else " (or none is in scope)"
        return f"prune: none of the {len(own)} {granularity} groups can be pruned{in_scope}: {why}; {hint}"
    return (f"prune: no {granularity} group in scope {scope} (exclude {exclude}); widen scope"
            if scope or exclude else f"prune: every {granularity} group has a single unit; {hint}")


def _removal(cands, removed: dict[int, list[int]]) -> dict[tuple[str, int], set[int]]:
    """(param, dim) -> indices to slice away, from the removed units of each group."""
    by_id = {g.id: g for g in cands}
    removal: dict[tuple[str, int], set[int]] = defaultdict(set)
    for gid, units in removed.items():
        for m in by_id[gid].members:
            removal[(m.param, m.dim)].update(m.indices[units].reshape(-1).tolist())
    return removal


