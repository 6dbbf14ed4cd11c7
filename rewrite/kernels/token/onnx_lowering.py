"""ONNX lowering of `rewrite::token_select` (definition: `kernels/token`)."""
from __future__ import annotations

from typing import Any


from ..registry import lowering
from . import FLOAT_MAX, keep_fraction


@lowering("rewrite::token_select", "onnx")
def token_select_onnx(scores: Any, keep: float, keep_first: int, keep_last: int) -> Any:
    """ONNX lowering: forced positions -> +inf, TopK(largest) for the kept set, TopK(smallest) to sort it.

    ONNX TopK returns equal values lower index first, matching the reference's stable sort.
    k is computed in the graph from the runtime length S with integer arithmetic.
    """
    from onnxscript import opset18 as op

    p, q = keep_fraction(keep)
    shape = op.Shape(scores)
    S = op.Gather(shape, op.Constant(value_ints=[1]))  # [1] int64
    ceil = op.Div(op.Add(op.Mul(S, op.Constant(value_ints=[p])), op.Constant(value_ints=[q - 1])), op.Constant(value_ints=[q]))
    k = op.Min(S, op.Max(op.Constant(value_ints=[keep_first + keep_last]), ceil))
    pos = op.Range(op.Constant(value_int=0), op.Squeeze(S), op.Constant(value_int=1))  # [S]
    first = op.Less(pos, op.Constant(value_int=keep_first))
    last = op.GreaterOrEqual(pos, op.Sub(op.Squeeze(S), op.Constant(value_int=keep_last)))
    forced = op.Unsqueeze(op.Or(first, last), op.Constant(value_ints=[0]))  # [1, S]
    s = op.Min(op.Cast(scores, to=1), op.Constant(value_float=FLOAT_MAX))
    s = op.Where(forced, op.Constant(value_float=float("inf")), s)
    _, idx = op.TopK(s, k, axis=1, largest=1, sorted=1)
    kept, _ = op.TopK(idx, k, axis=1, largest=0, sorted=1)
    return kept
