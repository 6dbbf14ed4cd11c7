"""Linear stand-ins for skipped regions: the skip pass's `compensate: linear`.

Removing a residual region routes its input x to where its output y went, so the stream after
it loses y - x. Much of that update is close to linear in x (a block's update is dominated by
directions that its input already carries), so each removed region can be replaced by

    x + x M + b        (one d x d matmul and a bias, about d^2 / (12 d^2) of a LLaMA block's weights)

fitted by least squares so that the stream matches the output the region had in the program as
the pass found it (LLM-Streamline's "replace the pruned layers by a light layer", fitted in closed
form). Regions are fitted in graph order on the program where the earlier ones are already
replaced, towards the *unremoved* program's output, so each map also corrects the drift that the
earlier removals left in its input (the same target as `prune_compensate.compensate_sequential`).

Checked, not trusted: the ridge strength is chosen by cross-validation over the calibration batches
(`prune_compensate.shrinkage_fit`, which also offers "no map", i.e. plain removal), and the chosen
map is kept only if its output error on the held-back batches is below plain removal's; otherwise
the region is removed plainly and the report says why.

Measured on SmolLM2-135M, ShortGPT's 4 of 30 blocks, 16 x 512 wiki-train calibration tokens:
wiki-dev perplexity 32.75 removed, 26.95 replaced (fp32 19.60; `benchmarks/llm_structure.py
--parts remove`).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.fx as fx

from rewrite.calibration import capture
from rewrite.inputs import Inputs
from rewrite.program import Program
from rewrite.progress import bar
from rewrite.statistics import token_rows

from .prune_compensate import Fold, _fold_error, shrinkage_fit
from .skip_blocks import ALIAS_NOTE, Region, resolve, skip_regions

aten = torch.ops.aten

STRENGTHS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
"""Ridge strengths tried per map, relative to the mean diagonal of E[x x^T]; plain removal (inf) is
always a candidate too. The residual stream is wide and the calibration long, so the useful strengths
are small (SmolLM2: 3e-4 .. 1e-2 chosen)."""
MAX_FOLDS = 4


def _folds(n_batches: int) -> int:
    return max(1, min(MAX_FOLDS, n_batches))


def _update_rows(program: Program, src: fx.Node, ref: Program, dst_ref: fx.Node, batch: Inputs
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """[x, 1] and the target update y_ref - x as float64 rows over the batch's real tokens."""
    x_val = capture(program, batch, [src])[src]
    y_val = capture(ref, batch, [dst_ref])[dst_ref]
    return update_rows(token_rows(program, src, x_val, batch), token_rows(ref, dst_ref, y_val, batch))


def update_rows(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[x, 1] and the update y - x, as float64 [tokens, features] rows (inputs of any leading shape)."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1), y - x


def add_rows(fold: Fold | None, xa: torch.Tensor, t: torch.Tensor) -> Fold:
    """`fold` (a new one when None) with the rows [x, 1] -> target update t added to its normal equations."""
    if fold is None:
        d = xa.shape[1]
        fold = Fold(torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, t.shape[1], dtype=torch.float64))
    fold.a += xa.T @ xa
    fold.c += xa.T @ t
    fold.n += xa.shape[0]
    return fold


def fit_map(folds: list[Fold], strengths: Iterable[float] = STRENGTHS) -> tuple[torch.Tensor | None, str]:
    """The stacked [M; b] of the stand-in, ridge cross-validated over `folds`; None when no map wins
    (plain removal). Returns (theta, how the strength was chosen)."""
    width = folds[0].a.shape[0]
    theta, lam, how = shrinkage_fit(folds, torch.zeros(width, width - 1, dtype=torch.float64), grid=tuple(strengths))
    return (None if math.isinf(lam) else theta), how


def _accumulate(program: Program, src: fx.Node, ref: Program, dst_ref: fx.Node, batches: list[Inputs],
                n_folds: int) -> tuple[list[Fold], float]:
    """Normal equations of the map per fold (batches dealt round-robin) and the sum of |y - x|^2."""
    folds: list[Fold | None] = [None] * n_folds
    plain = 0.0
    for i, batch in enumerate(batches):
        xa, t = _update_rows(program, src, ref, dst_ref, batch)
        folds[i % n_folds] = add_rows(folds[i % n_folds], xa, t)
        plain += float(t.pow(2).sum())
    return [f for f in folds if f is not None], plain


def _insert_map(program: Program, src: fx.Node, users: list[fx.Node], theta: torch.Tensor, name: str) -> fx.Node:
    """x + linear(x, M^T, b) after `src`, feeding `users` in place of `src`; returns the sum node."""
    graph = program.graph
    first = min(users, key=lambda u: list(graph.nodes).index(u))
    val = src.meta.get("val")
    dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
    weight = program.add_constant(f"{name}_skip_map_weight", theta[:-1].T.contiguous().to(dtype), before=first)
    bias = program.add_constant(f"{name}_skip_map_bias", theta[-1].contiguous().to(dtype), before=first)
    with graph.inserting_before(first):
        lin = graph.call_function(aten.linear.default, (src, weight, bias))
        out = graph.call_function(aten.add.Tensor, (src, lin))
    for node in (lin, out):
        if val is not None:
            node.meta["val"] = val
    for u in users:
        u.replace_input_with(src, out)
    return out


def replace_with_linear(program: Program, regions: Iterable[Region], batches: list[Inputs],
                        holdout: list[Inputs], strengths: Iterable[float] = STRENGTHS
                        ) -> tuple[list[dict[str, Any]], list[str], int]:
    """Skip `regions` in place, each replaced by a fitted x + x M + b where that beats plain removal.

    Returns (one report row per region, notes, nodes removed). `holdout` batches decide whether a
    map is kept (pass the calibration batches again when there are none: the check then only
    guards against a worse-than-removal fit).

    Example (a zoo LLaMA, its second block replaced by a map):
        >>> from rewrite import Program, zoo
        >>> from rewrite.calibration import CalibrationData
        >>> from rewrite.passes.skip_blocks import find_regions
        >>> z = zoo.load("llama", calibration_batches=3)
        >>> p = Program.capture(z.model, z.example)
        >>> calib = CalibrationData.from_user(z.calibration, z.example)
        >>> region = find_regions(p, "block").by_key()["layers.1"]
        >>> rows, notes, _ = replace_with_linear(p, [region], calib.batches, calib.holdout or calib.batches)
        >>> rows[0]["region"]
        'layers.1'
    """
    entry = program.clone()
    regions = list(regions)
    order = {n.name: i for i, n in enumerate(program.graph.nodes)}
    regions.sort(key=lambda r: order.get(resolve(program, r.stream_out), 0))
    strengths = tuple(strengths)
    rows: list[dict[str, Any]] = []
    kept = 0
    removed_nodes = 0
    for r in bar(regions, "skip: fit linear stand-ins", unit="region"):
        by_name = {n.name: n for n in program.graph.nodes}
        ref_by_name = {n.name: n for n in entry.graph.nodes}
        src = by_name[resolve(program, r.stream_in)]
        dst = by_name[resolve(program, r.stream_out)]
        dst_ref = ref_by_name[resolve(entry, r.stream_out)]
        folds, _ = _accumulate(program, src, entry, dst_ref, batches, _folds(len(batches)))
        width = folds[0].a.shape[0]
        theta, how = fit_map(folds, strengths)
        hold_folds, hold_plain = _accumulate(program, src, entry, dst_ref, holdout, 1)
        hold = hold_folds[0]
        hold_fit = hold_plain if theta is None else _fold_error(hold, theta) * max(hold.n, 1) + hold_plain
        row: dict[str, Any] = {"region": r.key, "ridge": how,
                               "held-back error / removal's": round(hold_fit / max(hold_plain, 1e-30), 4)}
        users = list(dst.users)
        removed_nodes += skip_regions(program, [r])
        if theta is None:
            row["stand-in"] = "none (removed: cross-validation chose no map)"
        elif hold_fit >= hold_plain:
            row["stand-in"] = "none (removed: the map was worse than removal on held-back batches)"
        else:
            out = _insert_map(program, src, users, theta, r.key.replace(".", "_"))
            program.notes.setdefault(ALIAS_NOTE, {})[dst.name] = out.name
            row["stand-in"] = f"linear {width - 1}x{width - 1} + bias"
            row["params added"] = width * (width - 1)
            kept += 1
        rows.append(row)
    program.graph.lint()
    program.module.recompile()
    notes = [f"compensate linear: {kept} of {len(regions)} removed region(s) replaced by a fitted x + x M + b "
             f"({sum(r.get('params added', 0) for r in rows)} parameters added; the rest are plain removals, "
             "see the table)"]
    return rows, notes, removed_nodes
