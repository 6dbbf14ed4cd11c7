"""`rewrite::token_select`: the top-k token selection of the token pass (DESIGN §7).

```
torch.ops.rewrite.token_select(scores: f32[B, S], keep: float, keep_first: int, keep_last: int) -> i64[B, k]
k = min(S, max(keep_first + keep_last, ceil(keep * S)))
```
The first `keep_first` and last `keep_last` positions are always kept, the rest by largest
score (ties: lower index); the result is sorted ascending (original token order). Padding
is scored -inf by the caller.

Exactness of k: `ceil(keep * S)` is evaluated exactly, with `keep` read as the fraction
p/q = `keep_fraction(keep)` (closest fraction with q <= 10**6, so 0.7 is 7/10), i.e.
`k = (S*p + q - 1) // q` in integers. Plain double arithmetic would give ceil(0.07*100) = 8;
the integer form gives 7 in torch, in the fake (symbolic) shape, in ONNX and in TVM alike.

Forced positions: they are scored +inf, and every other score is first clamped to at most
the largest finite float32, so forced positions always win (a caller's +inf score does not
displace them).

This package is the op's definition (reference and fake implementations); its lowerings sit next
to it, `onnx_lowering` and `tvm_kernel`, each registered with `kernels.registry.lowering`.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch

MAX_DENOMINATOR = 10**6
FLOAT_MAX = float(torch.finfo(torch.float32).max)


def keep_fraction(keep: float) -> tuple[int, int]:
    """The exact ratio (p, q) that stands for `keep` in the count of kept tokens."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"token_select: keep must be in (0, 1], got {keep}")
    f = Fraction(keep).limit_denominator(MAX_DENOMINATOR)
    return f.numerator, f.denominator


def keep_count(S: Any, keep: float, keep_first: int = 0, keep_last: int = 0) -> Any:
    """k for a sequence of length S (an int or a SymInt): min(S, max(first+last, ceil(keep*S)))."""
    p, q = keep_fraction(keep)
    k = (S * p + (q - 1)) // q
    if isinstance(S, int):
        return min(S, max(keep_first + keep_last, k))
    return torch.sym_min(S, torch.sym_max(keep_first + keep_last, k))


def prepare_scores(scores: torch.Tensor, keep_first: int, keep_last: int) -> torch.Tensor:
    """Scores with forced positions at +inf and every other score clamped to <= float32 max."""
    S = scores.shape[1]
    pos = torch.arange(S, device=scores.device)
    forced = (pos < keep_first) | (pos >= S - keep_last)
    s = scores.float().clamp(max=FLOAT_MAX)
    return torch.where(forced.unsqueeze(0), torch.full_like(s, float("inf")), s)


@torch.library.custom_op("rewrite::token_select", mutates_args=())
def token_select(scores: torch.Tensor, keep: float, keep_first: int, keep_last: int) -> torch.Tensor:
    """Reference implementation (defines the numerics)."""
    if scores.dim() != 2:
        raise ValueError(f"token_select: scores must be [B, S], got shape {tuple(scores.shape)}")
    S = scores.shape[1]
    k = keep_count(S, keep, keep_first, keep_last)
    s = prepare_scores(scores, keep_first, keep_last)
    # stable descending sort: equal scores keep their index order (lower index first)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values.to(torch.int64)


@token_select.register_fake
def _token_select_fake(scores: torch.Tensor, keep: float, keep_first: int, keep_last: int) -> torch.Tensor:
    B, S = scores.shape
    return scores.new_empty((B, keep_count(S, keep, keep_first, keep_last)), dtype=torch.int64)


def _flops(scores_shape: Any, *args: Any, **kwargs: Any) -> int:
    return 0


def _register_flops() -> None:
    try:
        from torch.utils.flop_counter import register_flop_formula

        register_flop_formula(torch.ops.rewrite.token_select.default)(_flops)
    except Exception:  # noqa: BLE001 - FLOP counting of a selection is 0 either way
        pass


_register_flops()
