"""Which units the prune pass removes: candidate groups, unit scores, allocation.

Pure functions over `rewrite.dims` groups. Scores come from the importance package
(`passes.importance`: weight scores reduced over each group's members); when it is not
importable a plain magnitude score stands in, and the plan says so.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from rewrite.dims import Group
from rewrite.program import Program

GRANULARITY_KINDS = {"head": ("head", "kv_head"), "neuron": ("neuron",), "channel": ("channel", "neuron")}
# The defaults of `importance`, `compensate` and `allocation` for heads and neurons were selected on the
# train-held-out split (the last 1000 STS-B train pairs, never dev) by benchmarks/robustness.py at the default
# calibration (128 sentences padded to 64): all-MiniLM-L6-v2 heads+FFN 25%, selection drop 0.45 for obs with
# heads allocated globally, 2.05 wanda + lstsq, 3.88 wanda alone; table and rule in benchmarks/README.md.
# Where OBS cannot run, the default falls back to wanda with the default compensation (lstsq).
DEFAULT_IMPORTANCE = {"head": "obs", "neuron": "obs", "channel": "magnitude", "unstructured": "wanda", "n:m": "wanda"}
DEFAULT_COMPENSATE: dict[str, object] = {"head": "lstsq", "neuron": "lstsq", "channel": False, "unstructured": False,
                                         "n:m": False}
DEFAULT_ALLOCATION = {("head", "obs"): "global"}
"""(granularity, importance) -> allocation; every other pair: uniform."""


@dataclass
class Plan:
    groups: list[Group]
    scores: dict[int, torch.Tensor]
    removed: dict[int, list[int]] = field(default_factory=dict)
    importance: str = ""
    notes: list[str] = field(default_factory=list)


def _match(path: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, g) or path.startswith(g.rstrip("*").rstrip(".") + ".") and g.endswith("*") for g in globs)


def candidates(groups: list[Group], granularity: str, scope: Sequence[str] | None, exclude: Sequence[str]) -> list[Group]:
    """Prunable groups of the granularity's kinds whose producing ops are all in scope (and none excluded)."""
    kinds = GRANULARITY_KINDS[granularity]
    out = []
    for g in groups:
        if not g.prunable or g.kind not in kinds or g.size < 2:
            continue
        mods = [m.module for m in g.producers]
        if scope and not all(_match(m, scope) for m in mods):
            continue
        if exclude and any(_match(m, exclude) for m in mods):
            continue
        out.append(g)
    return out


# ----------------------------------------------------------------------------- scores
def unit_scores(program: Program, groups: list[Group], kind: str, batches: list[Any] | None, *, reduce: str = "sum",
                normalize: bool = True, cache: dict | None = None, task_loss: Any = None, original: Program | None = None,
                ) -> tuple[dict[int, torch.Tensor], list[str]]:
    """Group id -> score per unit (higher = keep), from the importance package when available."""
    notes: list[str] = []
    try:
        from rewrite.passes.importance.weight import weight_scores
        try:
            from rewrite.passes.importance.groups import group_scores
        except ImportError:  # pragma: no cover - older layout
            from rewrite.passes.importance.weight import group_scores  # type: ignore[no-redef]
    except ImportError:
        notes.append(f"rewrite.passes.importance is not available: importance {kind!r} replaced by weight magnitude (L2)")
        return _magnitude_scores(program, groups, normalize), notes
    params = sorted({m.param for g in groups for m in g.members if program.param(m.param).dim() >= 2})
    kw: dict[str, Any] = {"params": params, "cache": cache}
    if kind == "taylor":
        kw.update(task_loss=task_loss, original=original)
    scores = weight_scores(program, batches, kind, **kw)
    return group_scores(groups, scores, reduce=reduce, normalize=normalize), notes


def _magnitude_scores(program: Program, groups: list[Group], normalize: bool) -> dict[int, torch.Tensor]:
    out = {}
    for g in groups:
        v = torch.zeros(g.size)
        for m in g.members:
            w = program.param(m.param).detach().float()
            if w.dim() < 2:
                continue
            sq = (w * w).index_select(m.dim, m.indices.reshape(-1)).movedim(m.dim, 0).reshape(g.size, -1).sum(1)
            v += sq
        if normalize and v.mean() > 0:
            v = v / v.mean()
        out[g.id] = v
    return out


# ----------------------------------------------------------------------------- allocation
def unit_multiple(g: Group, round_to: int) -> int:
    """Units to keep in multiples of this so every member's width is a multiple of round_to."""
    width = g.unit if g.kind in ("head", "kv_head") else 1
    return max(1, round_to // math.gcd(round_to, width))


def _round_keep(g: Group, keep: int, round_to: int) -> int:
    r = unit_multiple(g, round_to)
    keep = max(keep, 1)
    keep = min(g.size, int(math.ceil(keep / r)) * r)
    return keep


def removal_count(g: Group, remove: int, round_to: int) -> int:
    """Units to remove from `g` when `remove` are asked for: fewer when the kept count must round up."""
    return g.size - _round_keep(g, g.size - remove, round_to)


def uniform_counts(groups: list[Group], amount: float, round_to: int) -> dict[int, int]:
    """`amount` of every group, rounded to the nearest whole unit (half up, never every unit): a group
    of 2 KV heads asked for 25% loses one KV head rather than silently nothing (`rounding_notes` says so)."""
    return {g.id: removal_count(g, min(g.size - 1, int(math.floor(amount * g.size + 0.5 + 1e-9))), round_to)
            for g in groups}


def rounding_notes(groups: list[Group], amount: float, counts: dict[int, int]) -> list[str]:
    """Plain-language notes where whole units make the removed share differ from `amount`."""
    notes = []
    by_kind: dict[tuple[str, int, int], list[Group]] = {}
    for g in groups:
        if abs(counts[g.id] - amount * g.size) > 1e-6:
            by_kind.setdefault((g.kind, g.size, counts[g.id]), []).append(g)
    for (kind, size, count), gs in by_kind.items():
        unit = (f"KV heads ({gs[0].heads_per_unit} query heads each; grouped-query attention removes a KV head "
                "with its query heads)" if kind == "kv_head" else f"{kind} units")
        notes.append(f"{len(gs)} groups of {size} {unit}: {amount:.0%} is {amount * size:g} units, rounded to "
                     f"{count} removed per group ({count / size:.0%})" + (": nothing removed there" if count == 0 else ""))
    return notes


def allocate_uniform(groups: list[Group], scores: dict[int, torch.Tensor], amount: float, round_to: int) -> dict[int, list[int]]:
    counts = uniform_counts(groups, amount, round_to)
    return {g.id: sorted(torch.argsort(scores[g.id], stable=True)[: counts[g.id]].tolist()) for g in groups}


def counts_from_curves(groups: list[Group], curves: dict[int, torch.Tensor], amount: float, cap: float,
                       round_to: int) -> dict[int, int]:
    """Units to remove per group: repeatedly the cheapest next removal model-wide (the increase of
    its group's cost curve, curve[n] = cost of removing n units), `amount` of all units in total,
    at most `cap` of one group."""
    target = int(math.floor(amount * sum(g.size for g in groups) + 1e-9))
    counts = {g.id: 0 for g in groups}
    limit = {g.id: min(g.size - 1, int(math.floor(cap * g.size))) for g in groups}
    for _ in range(target):
        open_ = [gid for gid in counts if counts[gid] < limit[gid]]
        if not open_:
            break
        gid = min(open_, key=lambda i: float(curves[i][counts[i] + 1] - curves[i][counts[i]]))
        counts[gid] += 1
    return {g.id: removal_count(g, counts[g.id], round_to) for g in groups}


def allocate_global(groups: list[Group], scores: dict[int, torch.Tensor], cost: dict[int, float], target: float,
                    cap: float, round_to: int) -> dict[int, list[int]]:
    """Remove the lowest-scored units model-wide until `target` cost is removed (cost per unit
    per group; target in the same unit), never more than `cap` of one group."""
    entries = [(float(scores[g.id][u]), g.id, u) for g in groups for u in range(g.size)]
    entries.sort()
    by_id = {g.id: g for g in groups}
    removed: dict[int, list[int]] = {g.id: [] for g in groups}
    done = 0.0
    for s, gid, u in entries:
        if done >= target - 1e-9:
            break
        g = by_id[gid]
        if len(removed[gid]) + 1 > int(math.floor(cap * g.size)) or g.size - len(removed[gid]) - 1 < 1:
            continue
        removed[gid].append(u)
        done += cost[gid]
    out = {}
    for g in groups:
        keep = _round_keep(g, g.size - len(removed[g.id]), round_to)
        gone = sorted(removed[g.id], key=lambda u: float(scores[g.id][u]))[: g.size - keep]
        out[g.id] = sorted(gone)
    return out


def op_positions(program: Program) -> dict[str, float]:
    """Parameter target -> output positions (tokens, pixels) of the first op reading it."""
    positions: dict[str, float] = {}
    for n in program.graph.nodes:
        if n.op != "call_function" or not isinstance(n.meta.get("val"), torch.Tensor):
            continue
        for a in n.args[:3]:
            if getattr(a, "op", None) == "get_attr" and str(a.target) not in positions:
                shape = Program.concrete_shape(n)
                feat = shape[1] if len(shape) == 4 else (shape[-1] if shape else 1)
                positions[str(a.target)] = float(np.prod(shape)) / max(feat, 1) if shape else 1.0
    return positions


def unit_flops(program: Program, g: Group, positions: dict[str, float]) -> float:
    """FLOPs one unit costs on the example inputs: 2 x weight slice x output positions of its op."""
    total = 0.0
    for m in g.members:
        w = program.param(m.param)
        if w.dim() < 2:
            continue
        other = float(np.prod([s for i, s in enumerate(w.shape) if i != m.dim]))
        total += 2.0 * other * m.indices.shape[1] * positions.get(m.param, 1.0)
    return total
