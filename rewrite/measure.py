"""What a program costs (params, FLOPs, weight bytes) and how close it is to another one.

FLOPs are counted by running the program once on its example inputs under
torch's FlopCounterMode (matmul, linear, conv, attention), so they follow the shapes the
rewrite really produced. Custom ops register their own FLOP formulas in `kernels`.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.utils._pytree as pytree
from pydantic import BaseModel
from torch.utils.flop_counter import FlopCounterMode

from .compare import compare
from .inputs import Inputs
from .program import Program


class Cost(BaseModel):
    params: int
    """Number of weight values the model computes with (a packed int4 weight counts its logical size)."""
    weight_bytes: int
    """Bytes of every tensor the graph reads (packed weights count their packed size)."""
    flops: int
    """FLOPs (multiply-add = 2) of one forward pass on the example inputs."""

    @property
    def weight_mb(self) -> float:
        return self.weight_bytes / 1e6


class Fidelity(BaseModel):
    """Agreement of a rewritten program with the original on held-back batches."""

    cosine: float
    rel_error: float
    max_abs_error: float
    batches: int
    compared: str = "all outputs"

    @property
    def cosine_drop(self) -> float:
        return 1.0 - self.cosine


def cost(program: Program) -> Cost:
    params = program.params()
    n_params = 0
    n_bytes = 0
    for name, t in params.items():
        n_bytes += t.numel() * t.element_size()
        logical = program.notes.get("logical_numel", {}).get(name)
        if t.is_floating_point() or logical is not None:
            n_params += int(logical if logical is not None else t.numel())
    return Cost(params=n_params, weight_bytes=n_bytes, flops=count_flops(program))


def count_flops(program: Program, inputs: Inputs | None = None) -> int:
    inputs = inputs or program.example
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        inputs.call(program.module)
    return int(counter.get_total_flops())


def flat_float_outputs(out: Any) -> list[torch.Tensor]:
    return [t.detach().float() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def paired_outputs(ref: Any, got: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The float leaves of two outputs, paired by their path in the output structure.

    Outputs with the same structure pair by position as before; when a rewrite removed some
    outputs (a skipped layer's KV-cache entry: `present.{i}.key` keyed by the model's layer
    number), the remaining ones still meet their originals and the removed ones are left out.
    """
    def leaves(out: Any) -> dict[Any, torch.Tensor]:
        flat, _ = pytree.tree_flatten_with_path(out)
        return {tuple(str(k) for k in path): t for path, t in flat
                if isinstance(t, torch.Tensor) and t.is_floating_point()}

    a, b = leaves(ref), leaves(got)
    if list(a) == list(b) or len(a) != len(b) and not set(a) & set(b):
        return flat_float_outputs(ref), flat_float_outputs(got)
    common = [k for k in a if k in b]
    return [a[k].detach().float() for k in common], [b[k].detach().float() for k in common]


def compare_outputs(ref: Any, got: Any) -> tuple[float, float, float, str] | None:
    """(cosine, relative L2 error, max abs error, what was compared) over float leaves.

    Leaves are paired by position (`rewrite.compare.compare`); pairs whose shapes differ (a
    token-pruned sequence output without restoration) are skipped and named in the description.
    """
    n_ref, n_got = len(flat_float_outputs(ref)), len(flat_float_outputs(got))
    a, b = paired_outputs(ref, got)
    same = sum(x.shape == y.shape for x, y in zip(a, b))
    if not same:
        return None
    agreement = compare(zip(a, b), skip_mismatched_shapes=True)
    what = ("all outputs" if same == len(a) == n_ref == n_got else
            f"{same} of {max(n_ref, n_got)} outputs (others changed shape or were removed)")
    return agreement.cosine, agreement.rel_l2, agreement.max_abs, what


def fidelity(original: Program, rewritten: Program, batches: Iterable[Inputs]) -> Fidelity | None:
    cos_sum = rel_sum = 0.0
    mx = 0.0
    n = 0
    what = "all outputs"
    with torch.no_grad():
        for batch in batches:
            res = compare_outputs(original.run(batch), rewritten.run(batch))
            if res is None:
                continue
            c, r, m, what = res
            cos_sum += c
            rel_sum += r
            mx = max(mx, m)
            n += 1
    if n == 0:
        return None
    return Fidelity(cosine=cos_sum / n, rel_error=rel_sum / n, max_abs_error=mx, batches=n, compared=what)


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan
