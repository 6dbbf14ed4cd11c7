"""Group importance: what structured pruning removes, scored from its members' weights.

A group (from `rewrite.dims.find_groups`) is a set of coupled dimensions: one attention
head across q, k, v and the output projection, one FFN neuron across up/gate and down,
one conv channel across conv, BN and the next conv. Unit u of the group covers, in every
member, the slice of the member's parameter at `member.indices[u]` along `member.dim`.

    score[u] = reduce(every weight-score element that unit u covers, over all members)

with reduce = sum | mean | max. Members whose parameter has no score (biases, norms,
parameters out of scope) are skipped; so are members whose role is not in `roles`
(WINA scores only the consumer side). With `normalize`, each group's scores are divided
by their mean over the group's units, so groups of different layers and widths can be
ranked on one scale (raw magnitudes differ per layer, and ranking them globally is known
to be wrong).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

REDUCTIONS = ("sum", "mean", "max")


def member_unit_scores(score: torch.Tensor, dim: int, indices: torch.Tensor) -> torch.Tensor:
    """[size, elements]: the score elements each unit covers in one member."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    if idx.dim() == 1:
        idx = idx.reshape(-1, 1)
    size, k = idx.shape
    picked = score.index_select(dim, idx.reshape(-1)).movedim(dim, 0)  # [size*k, ...]
    return picked.reshape(size, k, -1).reshape(size, -1)


def group_scores(groups: Iterable[Any], scores: dict[str, torch.Tensor], reduce: str = "sum", normalize: bool = True,
                 *, roles: Sequence[str] | None = None) -> dict[int, torch.Tensor]:
    """Group id -> score per unit [group.size]; higher = more important.

    `scores` is what `weight_scores` returns; `roles` defaults to `scores.roles` when set.
    Groups none of whose members has a score are left out.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; valid: {', '.join(REDUCTIONS)}")
    roles = roles if roles is not None else getattr(scores, "roles", None)
    out: dict[int, torch.Tensor] = {}
    for g in groups:
        parts = []
        for m in g.members:
            if (roles is not None and m.role not in roles) or m.role == "carried":
                continue  # a carried table is sliced with the group but says nothing of its importance
            s = scores.get(m.param)
            if s is None or m.dim >= s.dim():
                continue
            parts.append(member_unit_scores(s.float(), m.dim, m.indices))
        if not parts:
            continue
        elems = torch.cat(parts, dim=1)
        if reduce == "sum":
            v = elems.sum(1)
        elif reduce == "mean":
            v = elems.mean(1)
        else:
            v = elems.max(1).values
        if normalize:
            mean = v.mean()
            if mean > 0:
                v = v / mean
        out[g.id] = v
    return out


def group_rows(groups: Iterable[Any], gscores: dict[int, torch.Tensor], removed: dict[int, Sequence[int]] | None = None,
               kind: str = "") -> list[dict[str, Any]]:
    """Report rows (one per group): the scores that drove a pruning decision.

    `removed`: group id -> removed unit indices, when a pass made a decision.
    """
    rows = []
    for g in groups:
        v = gscores.get(g.id)
        if v is None:
            continue
        row: dict[str, Any] = {"group": g.id, "kind": g.kind, "layer": g.layer or "", "units": g.size}
        if kind:
            row["importance"] = kind
        row.update({"min": round(float(v.min()), 4), "mean": round(float(v.mean()), 4), "max": round(float(v.max()), 4)})
        if removed is not None:
            gone = sorted(int(i) for i in removed.get(g.id, ()))
            kept = [i for i in range(g.size) if i not in set(gone)]
            row["removed"] = len(gone)
            row["max removed score"] = round(float(v[gone].max()), 4) if gone else None
            row["min kept score"] = round(float(v[kept].min()), 4) if kept else None
        rows.append(row)
    return rows


def annotate_group_scores(program: Any, groups: Iterable[Any], gscores: dict[int, torch.Tensor], kind: str) -> None:
    """Durable group scores in program.notes["importance"]["groups"][kind][group id]."""
    table = program.notes.setdefault("importance", {}).setdefault("groups", {}).setdefault(kind, {})
    for g in groups:
        if g.id in gscores:
            table[g.id] = {"kind": g.kind, "layer": g.layer, "scores": gscores[g.id]}


def head_matrix(groups: Iterable[Any], gscores: dict[int, torch.Tensor]) -> tuple[list[str], torch.Tensor | None]:
    """(layer names, [layers, heads] matrix) of attention-head group scores, for heat maps."""
    heads = [(g.layer or str(g.id), gscores[g.id]) for g in groups if g.kind in ("head", "kv_head") and g.id in gscores]
    if not heads:
        return [], None
    width = max(v.numel() for _, v in heads)
    mat = torch.full((len(heads), width), float("nan"))
    for r, (_, v) in enumerate(heads):
        mat[r, : v.numel()] = v
    return [name for name, _ in heads], mat
