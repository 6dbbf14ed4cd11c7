"""`cleanup`: remove dropout, fold constants, fold batch norm into the preceding conv/linear.

Dropout removal and batch-norm folding are rules (`rewrite.rules`: pattern, check with a reason,
replacement); a batch norm that cannot be folded is named in the report with the reason.
Constant folding is a sweep over the graph. The pass reports the counts. Dead code is eliminated by the pass manager afterwards.
"""
from __future__ import annotations

import operator
from typing import Any, Literal

import torch
import torch.fx as fx

from rewrite.pass_base import Pass, PassContext, PassResult, register
from rewrite.program import Program
from rewrite.rules import Rule, RuleOutcome, apply_rules
from rewrite.spec import StrictModel

aten = torch.ops.aten
DROPOUT_OPS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default, aten.feature_alpha_dropout.default}
BATCH_NORM_OPS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
FOLDABLE_PRODUCERS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default}
NONDETERMINISTIC = {aten.rand.default, aten.randn.default, aten.randint.default, aten.bernoulli.default, aten.normal.Tensor_float}


def _bypass_dropout(node: fx.Node, program: Program) -> dict[str, Any]:
    node.replace_all_uses_with(node.args[0])
    program.graph.erase_node(node)
    return {}


DROPOUT_RULE: Rule[Program] = Rule(
    "dropout removal", tuple(DROPOUT_OPS), match=lambda node, program: True,
    check=lambda node, program: None,  # eval-mode dropout is the identity: always removable
    replace=_bypass_dropout)


def remove_dropout(program: Program) -> int:
    """Eval-mode dropout is the identity: route its input to its users."""
    return len(apply_rules(program.graph, [DROPOUT_RULE], program).applied)


def fold_constants(program: Program) -> int:
    """Evaluate nodes that depend only on buffers (not inputs, not parameters) once.

    Parameters are left alone so that later passes still see weights as weights.
    """
    graph = program.graph
    params = {name for name, _ in program.module.named_parameters()}
    constant: dict[fx.Node, torch.Tensor] = {}
    for node in graph.nodes:
        if node.op == "get_attr" and str(node.target) not in params:
            val = program.param(node)
            if isinstance(val, torch.Tensor):
                constant[node] = val
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target in NONDETERMINISTIC or not node.all_input_nodes:
            continue
        if str(getattr(node.target, "namespace", "")) == "rewrite":
            continue  # our custom ops (packed weights) must stay packed
        if not all(a in constant for a in node.all_input_nodes):
            continue
        if not isinstance(node.meta.get("val"), torch.Tensor) or not callable(node.target):
            continue
        args = fx.node.map_arg(node.args, lambda a: constant[a])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: constant[a])
        try:
            with torch.no_grad():
                value = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - an op that cannot run eagerly is simply not folded
            continue
        if not isinstance(value, torch.Tensor) or value.numel() > 1_000_000:
            continue
        new = program.add_constant(f"_folded_{node.name}", value.contiguous(), before=node)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        constant[new] = value
        folded += 1
    return folded


def _bn_eps(bn: fx.Node) -> float:
    return bn.args[7] if bn.target is aten.batch_norm.default else bn.args[6]


def _bn_check(bn: fx.Node, program: Program) -> str | None:
    """Why this batch norm (after a conv or linear) cannot be folded into it; None if it can."""
    prod = bn.args[0]
    if len(prod.users) != 1:
        return f"{prod.name}'s output is also read elsewhere (folding would change those readers)"
    if bn.target is aten.batch_norm.default and bn.args[5]:
        return "batch norm in training mode (it normalises by batch statistics)"
    w_node = prod.args[1]
    b_node = prod.args[2] if len(prod.args) > 2 else None
    if not isinstance(w_node, fx.Node) or w_node.op != "get_attr":
        return f"{prod.name}'s weight is computed, not a parameter"
    if b_node is not None and (not isinstance(b_node, fx.Node) or b_node.op != "get_attr"):
        return f"{prod.name}'s bias is computed, not a parameter"
    if not all(isinstance(a, fx.Node) for a in bn.args[3:5]):
        return "batch norm without running statistics"
    return None


def _bn_fold(bn: fx.Node, program: Program) -> dict[str, Any]:
    """Scale the producer's weight rows and shift its bias, then read the producer instead of the norm."""
    prod = bn.args[0]
    w_node = prod.args[1]
    b_node = prod.args[2] if len(prod.args) > 2 else None
    gamma, beta, mean, var = (program.param(a) if isinstance(a, fx.Node) else None for a in bn.args[1:5])
    weight = program.param(w_node)
    bias = program.param(b_node) if b_node is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    scale = (gamma if gamma is not None else torch.ones_like(mean)) / torch.sqrt(var + _bn_eps(bn))
    shift = (beta if beta is not None else torch.zeros_like(mean)) - mean * scale
    program.set_param(str(w_node.target), weight * scale.reshape(-1, *([1] * (weight.dim() - 1))))
    new_b = bias * scale + shift
    if b_node is not None:
        program.set_param(str(b_node.target), new_b)
    else:
        b_new = program.add_constant(f"{str(w_node.target).replace('.', '_')}_bn_bias", new_b, before=prod)
        args = list(prod.args) + [None] * (3 - len(prod.args))
        args[2] = b_new
        prod.args = tuple(args)
    if bn.target is aten.batch_norm.default:
        bn.replace_all_uses_with(prod)
    else:  # returns (out, mean, invstd): only getitem 0 may be used
        for user in list(bn.users):
            if user.target is operator.getitem and user.args[1] == 0:
                user.replace_all_uses_with(prod)
    return {"into": prod.name}


BATCH_NORM_RULE: Rule[Program] = Rule(
    "batch norm folding", tuple(BATCH_NORM_OPS),
    match=lambda bn, program: isinstance(bn.args[0], fx.Node) and bn.args[0].target in FOLDABLE_PRODUCERS,
    check=_bn_check, replace=_bn_fold)


def fold_batch_norm(program: Program) -> RuleOutcome:
    """Fold eval-mode batch norm into the conv or linear that feeds only it (the outcome says which
    could not be folded, and why)."""
    outcome = apply_rules(program.graph, [BATCH_NORM_RULE], program)
    program.graph.eliminate_dead_code()
    return outcome


# --------------------------------------------------------------------------- spec
class CleanupSpec(StrictModel):
    """Dropout removal, constant folding, batch-norm folding and dead-code elimination."""

    kind: Literal["cleanup"] = "cleanup"
    dropout: bool = True
    fold_constants: bool = True
    fold_batchnorm: bool = True


@register
class CleanupPass(Pass):
    spec_class = CleanupSpec

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        counts = {}
        if self.spec.dropout:
            counts["dropout removed"] = remove_dropout(program)
        notes: list[str] = []
        if self.spec.fold_batchnorm:
            bn = fold_batch_norm(program)
            counts["batch norms folded"] = len(bn.applied)
            notes += [f"skipped {r}" for r in bn.reasons()]
        if self.spec.fold_constants:
            counts["constants folded"] = fold_constants(program)
        before = len(program.graph.nodes)
        program.graph.eliminate_dead_code()
        counts["dead nodes removed"] = before - len(program.graph.nodes)
        summary = ", ".join(f"{v} {k}" for k, v in counts.items())
        return PassResult(program, summary=summary, details=counts, notes=notes)
