"""`cleanup`: remove dropout, fold constants, fold batch norm into the preceding conv/linear.

Each step is a small function on a Program that returns how many nodes it changed; the
pass reports those counts. Dead code is eliminated by the pass manager afterwards.
"""
from __future__ import annotations

from typing import Literal
import torch
import torch.fx as fx

from rewrite.pass_base import Pass, PassContext, PassResult, register
from rewrite.program import Program
from rewrite.spec import StrictModel

aten = torch.ops.aten
DROPOUT_OPS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default, aten.feature_alpha_dropout.default}
BATCH_NORM_OPS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
FOLDABLE_PRODUCERS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default}
NONDETERMINISTIC = {aten.rand.default, aten.randn.default, aten.randint.default, aten.bernoulli.default, aten.normal.Tensor_float}


def remove_dropout(program: Program) -> int:
    """Eval-mode dropout is the identity: route its input to its users."""
    n = 0
    for node in program.nodes("call_function", target=tuple(DROPOUT_OPS)):
        node.replace_all_uses_with(node.args[0])
        program.graph.erase_node(node)
        n += 1
    return n


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


def fold_batch_norm(program: Program) -> int:
    """Fold eval-mode batch norm into the conv or linear that feeds only it."""
    folded = 0
    for bn in program.nodes("call_function", target=tuple(BATCH_NORM_OPS)):
        prod = bn.args[0]
        if not isinstance(prod, fx.Node) or prod.target not in FOLDABLE_PRODUCERS or len(prod.users) != 1:
            continue
        if bn.target is aten.batch_norm.default and bn.args[5]:  # training=True
            continue
        w_node = prod.args[1]
        b_node = prod.args[2] if len(prod.args) > 2 else None
        if not isinstance(w_node, fx.Node) or w_node.op != "get_attr":
            continue
        if b_node is not None and (not isinstance(b_node, fx.Node) or b_node.op != "get_attr"):
            continue
        gamma, beta, mean, var = (program.param(a) if isinstance(a, fx.Node) else None for a in bn.args[1:5])
        eps = bn.args[7] if bn.target is aten.batch_norm.default else bn.args[6]
        weight = program.param(w_node)
        bias = program.param(b_node) if b_node is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
        scale = (gamma if gamma is not None else torch.ones_like(mean)) / torch.sqrt(var + eps)
        shift = (beta if beta is not None else torch.zeros_like(mean)) - mean * scale
        new_w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        new_b = bias * scale + shift
        program.set_param(str(w_node.target), new_w)
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
                if user.target is __import__("operator").getitem and user.args[1] == 0:
                    user.replace_all_uses_with(prod)
        folded += 1
    program.graph.eliminate_dead_code()
    return folded


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
        if self.spec.fold_batchnorm:
            counts["batch norms folded"] = fold_batch_norm(program)
        if self.spec.fold_constants:
            counts["constants folded"] = fold_constants(program)
        before = len(program.graph.nodes)
        program.graph.eliminate_dead_code()
        counts["dead nodes removed"] = before - len(program.graph.nodes)
        summary = ", ".join(f"{v} {k}" for k, v in counts.items())
        return PassResult(program, summary=summary, details=counts)
