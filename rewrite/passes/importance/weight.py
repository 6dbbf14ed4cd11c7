"""Weight and channel importance: a score per weight element, shaped like the weight.

Higher is more important. For a weight W with input features j (linear W[i, j]; x @ W
layouts and convs are mapped to the same meaning, see `stats.input_view`) and calibration
tokens X (rows = tokens, padding excluded):

- `magnitude_l1`: |W[i, j]|.
- `magnitude_l2` (alias `magnitude`): W[i, j]^2, so a group reduced with `sum` gets its
  squared L2 norm (the same ranking as the L2 norm).
- `wanda`: |W[i, j]| * ||X[:, j]||_2, the L2 norm over every calibration token (Wanda).
- `hessian`: W[i, j]^2 * H[j, j] with H = X^T X summed over every calibration token: the
  OBS saliency w^2 / [H^-1]_jj with H replaced by its diagonal (constant factor 1/2
  dropped), as OBS/GPTQ-style methods use the layer-input second moment.
- `activation`: mean over tokens of |x_j|, the same for every output row (AWQ's salient
  input channels).
- `taylor`: |W * dL/dW| (see `gradients.py` for L).
- `wina`: mean |h_j| * ||W[:, j]||_2 for the hidden state h this weight consumes, the same
  for every output row (see `neuron.py`); only the consumer side of a group is meaningful,
  which the returned `Scores.roles` tells `group_scores`.

Convolutions: the input feature j is the input channel (statistics over every pixel), so
the score of W[o, c, kh, kw] uses channel c's statistic.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from rewrite.errors import PassError
from rewrite.inputs import Inputs
from rewrite.program import Program

from .kinds import alias, get, importance, names
from .stats import FeatureStats, Statistics, WeightOp, input_view, statistics, weight_ops

# ---------------------------------------------------------------- the weight kinds (registration order = spec order)
alias("weight", "magnitude", of="magnitude_l2")


@importance("weight", "magnitude_l1", source="weights")
def _magnitude_l1(w: torch.Tensor) -> torch.Tensor:
    return w.abs()


@importance("weight", "magnitude_l2", source="weights")
def _magnitude_l2(w: torch.Tensor) -> torch.Tensor:
    return w * w


@importance("weight", "wanda", source="stats")
def _wanda(op: WeightOp, w: torch.Tensor, st: FeatureStats) -> torch.Tensor:
    """|W| times the input feature's L2 norm over calibration tokens (Wanda)."""
    return w.abs() * input_view(op, w, st.l2)


@importance("weight", "taylor", source="gradients")
def _taylor(program: Program, batches: list[Inputs], params: list[str], task_loss: Any, original: Program | None) -> Scores:
    """|W * dL/dW| (first-order Taylor), the loss from `gradients.taylor_scores`."""
    from .gradients import taylor_scores

    out = Scores(taylor_scores(program, batches, params=params, task_loss=task_loss, original=original), kind="taylor")
    out.loss = taylor_scores.last_loss  # "task" | "distillation" | "probe" (see gradients.py)
    return out


@importance("weight", "hessian", source="stats")
def _hessian(op: WeightOp, w: torch.Tensor, st: FeatureStats) -> torch.Tensor:
    """W^2 times the diagonal of the input's second moment (OBD-style saliency)."""
    return w * w * input_view(op, w, st.sum_sq.float())


@importance("weight", "activation", source="stats")
def _activation(op: WeightOp, w: torch.Tensor, st: FeatureStats) -> torch.Tensor:
    """The input feature's mean |activation|, broadcast over the weight."""
    return input_view(op, w, st.mean_abs).clone()


@importance("weight", "wina", source="stats", roles=("consumer",))
def _wina(op: WeightOp, w: torch.Tensor, st: FeatureStats) -> torch.Tensor:
    """WINA: input activation times the weight's column norm (scores the consumer's input neurons)."""
    from .neuron import wina_vector

    return input_view(op, w, wina_vector(op, w, st)).clone()


KINDS = names("weight")


class Scores(dict):
    """param target -> score tensor shaped like the weight, plus how to reduce it.

    `kind`: the importance kind; `roles`: which group member roles carry the score
    (None = all; WINA scores only consumers).
    """

    def __init__(self, data: dict[str, torch.Tensor] | None = None, *, kind: str = "", roles: tuple[str, ...] | None = None):
        super().__init__(data or {})
        self.kind = kind
        self.roles = roles
        self.loss = ""
        """For taylor: which loss the gradients came from ("task", "distillation", "probe")."""


def canonical_kind(kind: str) -> str:
    """The registered name `kind` stands for (an alias resolved); PassError for an unknown kind."""
    if kind not in names("weight"):
        raise PassError(f"unknown weight importance {kind!r}; valid kinds: {', '.join(names('weight'))}")
    return get("weight", kind).name


def weight_scores(program: Program, batches: Sequence[Any] | None, kind: str, *, params: Sequence[str] | str | None = None,
                  task_loss: Callable[[Any, Inputs], torch.Tensor] | None = None, cache: dict[str, Any] | None = None,
                  original: Program | None = None, progress: bool | None = None) -> Scores:
    """Score every linear/conv weight in scope (`params`: targets, module paths or globs).

    `batches` are calibration batches (needed by every kind but magnitude); `cache` is
    `PassContext.cache` so all metrics share one calibration run; `task_loss(output, batch)`
    and `original` (the uncompressed Program) are used by `taylor` only.
    """
    kind = canonical_kind(kind)
    entry = get("weight", kind)
    ops = weight_ops(program, params)
    if entry.source == "weights":
        out = Scores(kind=kind)
        for op in ops:
            out[op.param] = entry.fn(program.param(op.param).detach().float())
        return out
    if not batches:
        raise PassError(f"importance {kind!r} needs calibration batches: pass calibration= to rewrite.compile")
    batches = [Inputs.of(b) for b in batches]
    if entry.source == "gradients":
        return entry.fn(program, batches, [op.param for op in ops], task_loss, original)
    stats = statistics(program, batches, cache=cache, progress=progress)
    return scores_from_stats(program, stats, kind, ops)


def scores_from_stats(program: Program, stats: Statistics, kind: str, ops: list[WeightOp] | None = None) -> Scores:
    """The statistics-based kinds (wanda, hessian, activation, wina) from collected stats."""
    kind = canonical_kind(kind)
    entry = get("weight", kind)
    if entry.source != "stats":
        raise PassError(f"importance {kind!r} is not computed from statistics")
    ops = ops if ops is not None else [s.op for s in stats.ops.values()]
    out = Scores(kind=kind, roles=entry.roles)
    for op in ops:
        if op.param not in stats:
            continue
        out[op.param] = entry.fn(op, program.param(op.param).detach().float(), stats[op.param].input)
    return out


def all_weight_scores(program: Program, batches: Sequence[Any] | None, kinds: Sequence[str], **kw: Any) -> dict[str, Scores]:
    """Several kinds at once: statistics are collected once and shared."""
    return {k: weight_scores(program, batches, k, **kw) for k in kinds}


def module_summary(program: Program, scores: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Per module: total score, and score per output row / per input feature."""
    by_param = {op.param: op for op in weight_ops(program)}
    out: dict[str, dict[str, Any]] = {}
    for param, s in scores.items():
        op = by_param.get(param)
        if op is None:
            continue
        rows_dim = 1 if op.kind == "matmul" else 0
        per_out = s.transpose(0, rows_dim).reshape(s.shape[rows_dim], -1).sum(1)
        per_in = s.transpose(0, op.in_dim).reshape(s.shape[op.in_dim], -1).sum(1)
        out[op.module] = {"param": param, "total": float(s.sum()), "mean": float(s.mean()),
                          "per_output": per_out, "per_input": per_in}
    return out


def module_rows(program: Program, scores: dict[str, torch.Tensor], kind: str | None = None) -> list[dict[str, Any]]:
    """Report rows (one per weight): the scores behind a decision, for `PassResult.details`."""
    kind = kind or getattr(scores, "kind", "")
    rows = []
    for module, m in module_summary(program, scores).items():
        s = scores[m["param"]]
        rows.append({"module": module, "importance": kind, "total": m["total"], "min": float(s.min()),
                     "median": float(s.float().median()), "max": float(s.max())})
    return rows


def annotate_weight_scores(program: Program, scores: Scores | dict[str, torch.Tensor], kind: str | None = None) -> None:
    """Write scores on the graph (see `passes.importance` for the keys)."""
    kind = kind or getattr(scores, "kind", "") or "weights"
    for op in weight_ops(program):
        if op.param in scores:
            prev = Program.annotation(op.node, "importance") or {}
            prev = dict(prev)
            prev[kind] = {"param": op.param, "score": scores[op.param]}
            Program.annotate(op.node, "importance", prev)
    notes = program.notes.setdefault("importance", {})
    modules = notes.setdefault("modules", {})
    for module, summary in module_summary(program, scores).items():
        modules.setdefault(module, {})[kind] = summary
