"""The calibration-statistics service: one padding policy for every data-driven pass.

Every statistic a pass gathers from calibration activations (sums, abs-max, ranges, X^T X,
row samples, refit targets) goes through `token_rows`, which flattens a value to
[tokens, features] and drops the tokens the model's padding mask marks as absent. A padded
token never enters a statistic, so the same sentences padded to the longest or to a fixed
length give the same statistics (up to float summation order).

Where the tokens are is found generically, from the symbolic shapes torch.export records:
the padding mask is the model's integer [B, S] input whose name says mask (as in
`attention_mask`); S is a symbol, and any value with a dimension whose expression is S
has its tokens along that dimension (batch along dim 0), and a dimension whose expression
is (batch symbol) x S is the flattened [B*S] token dimension (GPT-2's Conv1D `addmm`).
Values after an op that changes the sequence length (token selection) carry a new symbol and
get no mask (all of their rows count). Without symbolic shapes (a static capture) a value
whose leading dims equal the mask's shape is masked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx

from .inputs import Inputs
from .program import Program

SAMPLE_ROWS = 1024
"""Rows kept per value by `extend_sample` (`RowStats(keep_sample=True)`, AWQ's search sample)."""


# ----------------------------------------------------------------------------- where the tokens are
def padding_placeholder(program: Program) -> tuple[int, fx.Node] | None:
    """(flat input position, node) of the padding mask: an integer/bool [B, S] input named like a mask."""
    for i, ph in enumerate(program.placeholders()):
        val = ph.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 2 and not val.is_floating_point() and "mask" in ph.name:
            return i, ph
    return None


@dataclass(frozen=True)
class TokenLayout:
    """How a value's tokens line up with the [B, S] padding mask."""

    dim: int            # the token dimension (S, or B*S when flat)
    flat: bool          # True: `dim` is batch x sequence flattened
    symbolic: bool      # False: found by matching concrete sizes (static capture)


def _expr(size: Any) -> Any:
    return size.node.expr if isinstance(size, torch.SymInt) else None


def token_layout(program: Program, node: fx.Node) -> TokenLayout | None:
    """Where `node`'s tokens are (see the module docstring); None when it has no mask or no token dim."""
    found = padding_placeholder(program)
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if found is None or not isinstance(val, torch.Tensor):
        return None
    seq = _expr(found[1].meta["val"].shape[1])
    if seq is None:
        return TokenLayout(1, False, False) if val.dim() >= 3 else None
    for d, size in enumerate(val.shape):
        e = _expr(size)
        if e is None:
            continue
        if e == seq and d >= 1:
            return TokenLayout(d, False, True)
        if d == 0 and e.is_Mul and seq in e.args and len(e.args) == 2:
            return TokenLayout(0, True, True)
    return None


def token_keep(program: Program, node: fx.Node, value: torch.Tensor, batch: Inputs | None,
               feature_dim: int = -1) -> torch.Tensor | None:
    """Bool [value's shape without `feature_dim`]: True for real tokens; None when every row counts."""
    if batch is None or not isinstance(value, torch.Tensor):
        return None
    layout = token_layout(program, node)
    found = padding_placeholder(program)
    if layout is None or found is None:
        return None
    try:
        mask = program.flat_inputs(batch)[found[0]]
    except (KeyError, IndexError):
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    fd = feature_dim % value.dim()
    shape = [s for i, s in enumerate(value.shape) if i != fd]
    dim = layout.dim - (1 if layout.dim > fd else 0)
    if layout.dim == fd or dim >= len(shape):
        return None
    view = [1] * len(shape)
    if layout.flat:
        if shape[dim] != mask.numel():
            return None
        view[dim] = mask.numel()
    else:
        if dim == 0 or shape[0] != mask.shape[0] or shape[dim] != mask.shape[1]:
            return None
        view[0], view[dim] = mask.shape[0], mask.shape[1]
    return mask.reshape(view).bool().expand(shape)


def token_rows(program: Program, node: fx.Node, value: torch.Tensor, batch: Inputs | None,
               feature_dim: int = -1) -> torch.Tensor:
    """`value` as [real tokens, features]: features along `feature_dim` (channels for NCHW maps:
    every pixel is a token), padded tokens dropped."""
    fd = feature_dim % value.dim()
    rows = value.detach().movedim(fd, -1).reshape(-1, value.shape[fd])
    keep = token_keep(program, node, value, batch, fd)
    return rows if keep is None else rows[keep.reshape(-1)]


def token_weights(program: Program, node: fx.Node, value: torch.Tensor, batch: Inputs | None,
                  feature_dim: int = -1) -> torch.Tensor | None:
    """Float 0/1 weights over `value`'s tokens (shape without `feature_dim`); None when all count."""
    keep = token_keep(program, node, value, batch, feature_dim)
    return None if keep is None else keep.to(torch.float64)


def _batch_mask(batch: Inputs | None, value: torch.Tensor) -> torch.Tensor | None:
    """The batch's padding mask (its one [B, S] integer input named like a mask) when `value` is
    [B, S, features]; None when every row counts (no mask, or another layout)."""
    if batch is None or not isinstance(value, torch.Tensor) or value.dim() != 3:
        return None
    masks = [t for k, t in batch.kwargs.items() if "mask" in k and isinstance(t, torch.Tensor) and t.dim() == 2
             and not t.is_floating_point()]
    if len(masks) != 1 or tuple(value.shape[:2]) != tuple(masks[0].shape):
        return None
    return masks[0]


def output_token_weights(batch: Inputs | None, value: torch.Tensor, feature_dim: int = -1) -> torch.Tensor | None:
    """Float 0/1 weights over the tokens of a value known only by its shape (a program's final
    output compared outside the graph): the batch's padding mask (its [B, S] integer input named
    like a mask) when `value`'s leading dims are [B, S] and its features run along `feature_dim`;
    None when every row counts (no mask, or another layout, e.g. after token selection)."""
    mask = _batch_mask(batch, value) if feature_dim % 3 == 2 else None
    return None if mask is None else mask.to(torch.float64)


def shape_token_rows(batch: Inputs | None, value: torch.Tensor) -> torch.Tensor:
    """`value` as [real tokens, features], for a value known only by its shape (a module hook's
    input, outside any graph): the rows of a [B, S, features] value whose padding-mask entry is 0
    are dropped, as `token_rows` drops them in a graph; other layouts keep every row."""
    rows = value.detach().reshape(-1, value.shape[-1])
    mask = _batch_mask(batch, value)
    return rows if mask is None else rows[mask.reshape(-1).bool()]


def extend_sample(sample: list[torch.Tensor], rows: torch.Tensor, limit: int = SAMPLE_ROWS) -> None:
    """Append to `sample` (float32 row blocks) a strided subset of `rows` (real tokens only, as
    `token_rows` gives them) until it holds `limit` rows: every call contributes about limit / 4
    rows spread over its tokens, so a sample drawn over several batches is not only the first one."""
    kept = sum(s.shape[0] for s in sample)
    if kept < limit and rows.shape[0]:
        step = max(1, rows.shape[0] // max(1, limit // 4))
        sample.append(rows.detach()[::step][: limit - kept].float().clone())


# ----------------------------------------------------------------------------- streaming sums
@dataclass
class RowStats:
    """Running statistics over the real tokens of one value (float64 sums)."""

    n: int = 0
    sum: torch.Tensor | None = None
    sum_sq: torch.Tensor | None = None
    sum_abs: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    lo: float = float("inf")
    hi: float = float("-inf")
    sample: list[torch.Tensor] = field(default_factory=list)

    def update(self, rows: torch.Tensor, second_moment: bool = False, keep_sample: bool = False) -> None:
        if rows.shape[0] == 0:
            return
        r = rows.detach().to(torch.float64)
        add = lambda old, new: new if old is None else old + new  # noqa: E731
        self.sum = add(self.sum, r.sum(0))
        self.sum_sq = add(self.sum_sq, (r * r).sum(0))
        a = r.abs()
        self.sum_abs = add(self.sum_abs, a.sum(0))
        m = a.amax(0)
        self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)
        if second_moment:
            self.xtx = add(self.xtx, r.T @ r)
        self.lo, self.hi = min(self.lo, float(r.min())), max(self.hi, float(r.max()))
        if keep_sample:
            extend_sample(self.sample, rows)
        self.n += r.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)


class RowCollector:
    """Subscriber for `calibration.observe`: `RowStats` of each watched node's real tokens.

    `watch`: node -> (feature_dim, second_moment, keep_sample)."""

    def __init__(self, program: Program, watch: dict[fx.Node, tuple[int, bool, bool]]):
        self.program = program
        self.watch = watch
        self.stats: dict[fx.Node, RowStats] = {n: RowStats() for n in watch}

    def nodes(self, program: Program) -> Iterable[fx.Node]:
        return list(self.watch)

    def update(self, node: fx.Node, value: Any, batch: Inputs) -> None:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return
        fd, second, sample = self.watch[node]
        self.stats[node].update(token_rows(self.program, node, value, batch, fd), second, sample)


def row_statistics(program: Program, batches: list[Inputs], watch: dict[fx.Node, tuple[int, bool, bool]],
                   *, desc: str = "calibration statistics", progress: bool | None = None) -> dict[fx.Node, RowStats]:
    """One streaming run over `batches`: `RowStats` per watched node (padding excluded)."""
    from .calibration import observe

    col = RowCollector(program, watch)
    observe(program, batches, [col], desc=desc, progress=progress)
    return col.stats


def real_tokens(program: Program, batches: Iterable[Inputs]) -> int:
    """Real (unpadded) tokens in `batches`: mask ones, or batch x sequence without a mask."""
    found = padding_placeholder(program)
    total = 0
    for b in batches:
        flat = program.flat_inputs(b)
        m = flat[found[0]] if found is not None else None
        if isinstance(m, torch.Tensor):
            total += int(m.bool().sum())
        else:
            first = next((t for t in flat if isinstance(t, torch.Tensor)), None)
            total += int(first.shape[0] * (first.shape[1] if first is not None and first.dim() >= 2 else 1)) if first is not None else 0
    return total
