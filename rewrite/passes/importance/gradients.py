"""Gradients for first-order Taylor importance: |W * dL/dW|.

L is the user's task loss when given (`PassContext.task_loss`, called as
`task_loss(output, batch)` and returning a scalar), otherwise the self-distillation loss
of the output against the original model's output on the same batch:
sum over float output tensors of mean((y - y_orig)^2).

    score = |W * G|,  G = (1 / #batches) * sum_b dL_b/dW   (the gradient of the mean loss)

Only run when a metric that needs gradients (taylor) is requested.

Caveat, measured not assumed: on an unmodified model the self-distillation loss sits at
its minimum, so dL/dW is exactly zero and |W * G| says nothing. In that case (all
gradients zero) we use a random output probe instead: L_b = <v_b, y> with v_b standard
normal (seeded), and score = mean_b |W * dL_b/dW|. For Gaussian v, E|w * dL_v/dw| is
proportional to |w| * sqrt(sum_o (dy_o/dw)^2), the square root of the second-order
increase of the distillation loss when w is removed, so the ranking is that of the
distillation loss's Taylor expansion one order up. The result says which one was used
in `taylor_scores.last_loss`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from rewrite.inputs import Inputs
from rewrite.program import Program


def _float_leaves(output: Any) -> list[torch.Tensor]:
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def distillation_loss(output: Any, target: Any) -> torch.Tensor:
    """Sum over float output tensors of the mean squared difference to the target."""
    outs, refs = _float_leaves(output), _float_leaves(target)
    if len(outs) != len(refs):
        raise ValueError(f"output has {len(outs)} float tensors, the original {len(refs)}")
    return sum(((o - r.detach()) ** 2).mean() for o, r in zip(outs, refs) if o.shape == r.shape)


def _grads(program: Program, batches: list[Inputs], params: list[str], loss_fn: Callable[[Any, Inputs, int], torch.Tensor],
           absolute: bool) -> dict[str, torch.Tensor]:
    tensors = {p: program.param(p) for p in params}
    saved = {p: t.requires_grad for p, t in tensors.items()}
    acc = {p: torch.zeros_like(t, dtype=torch.float32) for p, t in tensors.items()}
    try:
        for t in tensors.values():
            t.requires_grad_(True)
        with torch.enable_grad():
            for i, batch in enumerate(batches):
                loss = loss_fn(program.fit_inputs(batch).call(program.module), batch, i)
                grads = torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)
                for (p, t), g in zip(tensors.items(), grads):
                    if g is None:
                        continue
                    acc[p] += (t.detach() * g).abs() if absolute else g.detach().float()
    finally:
        for p, t in tensors.items():
            t.requires_grad_(saved[p])
            t.grad = None
    n = max(len(batches), 1)
    if absolute:
        return {p: a / n for p, a in acc.items()}
    return {p: (tensors[p].detach().float() * (a / n)).abs() for p, a in acc.items()}


def taylor_scores(program: Program, batches: Sequence[Any], *, params: Sequence[str], task_loss: Callable[[Any, Inputs], torch.Tensor] | None = None,
                  original: Program | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """|W * dL/dW| for every parameter target in `params` (see the module docstring for L)."""
    batches = [Inputs.of(b) for b in batches]
    params = list(params)
    if task_loss is not None:
        taylor_scores.last_loss = "task"
        return _grads(program, batches, params, lambda out, b, i: task_loss(out, b), absolute=False)
    reference = original if original is not None else program
    with torch.no_grad():
        targets = [b.call(reference.module) for b in batches]
    scores = _grads(program, batches, params, lambda out, b, i: distillation_loss(out, targets[i]), absolute=False)
    if any(bool((s != 0).any()) for s in scores.values()):
        taylor_scores.last_loss = "distillation"
        return scores
    taylor_scores.last_loss = "probe"
    gen = torch.Generator().manual_seed(seed)

    def probe(out: Any, b: Inputs, i: int) -> torch.Tensor:
        leaves = _float_leaves(out)
        return sum((x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum() for x in leaves)

    return _grads(program, batches, params, probe, absolute=True)


taylor_scores.last_loss = ""
