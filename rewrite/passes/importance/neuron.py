"""Neuron importance: WINA (weight-informed neuron activation).

For a hidden unit j consumed by a weight W (linear W[out, hidden]):

    score_j = mean over calibration tokens of |h_j|  *  ||W[:, j]||_2

the hidden-state magnitude times the L2 norm of the weight column that reads it (for
x @ W layouts the row W[j, :]; for convs the channel slice W[:, c, ...]). WINA applies
this per token at run time to sparsify activations; here it is averaged over tokens,
as a static score for pruning FFN neurons.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from rewrite.inputs import Inputs
from rewrite.program import Program

from .stats import FeatureStats, WeightOp, statistics, weight_ops


def column_norms(op: WeightOp, weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of the weight slice that reads each input feature."""
    w = weight.detach().float()
    if op.kind == "matmul":
        return w.norm(dim=1)
    if op.kind == "linear":
        return w.norm(dim=0)
    # conv [out, in/groups, *k]: channel c of group g is read by that group's outputs only
    out_ch, in_g = w.shape[0], w.shape[1]
    per_group = out_ch // op.groups
    sq = (w * w).reshape(op.groups, per_group, in_g, -1).sum(dim=(1, 3))  # [groups, in_g]
    return sq.reshape(-1).sqrt()


def wina_vector(op: WeightOp, weight: torch.Tensor, st: FeatureStats) -> torch.Tensor:
    return st.mean_abs * column_norms(op, weight)


def neuron_scores(program: Program, batches: Sequence[Any], *, params: Sequence[str] | str | None = None,
                  cache: dict[str, Any] | None = None, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """WINA score per input unit of every consumer weight in scope: param -> [in_features]."""
    stats = statistics(program, [Inputs.of(b) for b in batches], cache=cache, progress=progress)
    out: dict[str, torch.Tensor] = {}
    for op in weight_ops(program, params):
        if op.param in stats:
            out[op.param] = wina_vector(op, program.param(op.param), stats[op.param].input)
    return out


def annotate_neuron_scores(program: Program, scores: dict[str, torch.Tensor]) -> None:
    """Durable per-module WINA vectors in program.notes["importance"]["neurons"]."""
    by_param = {op.param: op for op in weight_ops(program)}
    neurons = program.notes.setdefault("importance", {}).setdefault("neurons", {})
    for param, v in scores.items():
        if param in by_param:
            neurons[by_param[param].module] = {"param": param, "wina": v}
