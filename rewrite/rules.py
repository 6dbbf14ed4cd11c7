"""Local rewrites as rules: a pattern, a check that says why not, and a replacement.

Many rewrites replace one node (or a node and its producer) in place: removing eval-mode
dropout, folding a batch norm into the conv before it, patching the shape constants that
pruning left at an old width. Written as loops, each one mixes *where it could apply*,
*whether it may* and *what it does*, and the cases it skips vanish without a word. As rules
(in the style of onnxscript's rewriter) the three are separate functions and every skip
comes back with its reason, which the pass puts in its report:

- `match(node, ctx) -> bool`: the pattern beyond the root op (quietly false where the rule
  is not about this node at all: a batch norm after a ReLU is not a folding candidate);
- `check(node, ctx) -> str | None`: None where the rule applies, else the reason it cannot
  (a batch norm in training mode, a conv whose output has other readers);
- `replace(node, ctx) -> dict`: rewrites in place and returns what it changed.

    >>> import torch, torch.fx as fx
    >>> g = fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.ReLU())).graph
    >>> drop_second = Rule("drop second relu", ("call_module",), match=lambda n, ctx: n.target == "1",
    ...                    check=lambda n, ctx: None, replace=lambda n, ctx: _bypass(n))
    >>> def _bypass(n):
    ...     n.replace_all_uses_with(n.args[0]); n.graph.erase_node(n); return {}
    >>> apply_rules(g, [drop_second], None).counts()
    {'drop second relu': 1}

The IR core owns this module; passes own their rules.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, TypeVar

import torch.fx as fx

Ctx = TypeVar("Ctx")


@dataclass(frozen=True)
class Rule(Generic[Ctx]):
    """One local rewrite. `roots` are the op targets (or, for non-call nodes, the fx op names such
    as "call_module") the pattern starts from."""

    name: str
    roots: tuple[Any, ...]
    match: Callable[[fx.Node, Ctx], bool]
    check: Callable[[fx.Node, Ctx], str | None]
    replace: Callable[[fx.Node, Ctx], dict[str, Any]]


@dataclass
class RuleOutcome:
    """What a set of rules did to a graph: each application's record and each refusal's reason."""

    applied: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """{rule name: times applied}."""
        return dict(Counter(a["rule"] for a in self.applied))

    def reasons(self) -> list[str]:
        """One line per distinct refusal: 'rule: reason (nodes)'."""
        by: dict[tuple[str, str], list[str]] = {}
        for r in self.refused:
            by.setdefault((r["rule"], r["reason"]), []).append(r["node"])
        return [f"{rule}: {reason} ({', '.join(nodes[:4])}{', ...' if len(nodes) > 4 else ''})"
                for (rule, reason), nodes in by.items()]


def _roots_of(node: fx.Node) -> tuple[Any, ...]:
    return (node.target, node.op) if node.op == "call_function" else (node.op,)


def apply_rules(graph: fx.Graph, rules: Iterable[Rule[Ctx]], ctx: Ctx) -> RuleOutcome:
    """Apply each rule once to every node it matches, in graph order (rules in the order given).

    The node list is taken before the rules run, so a replacement's new nodes are not revisited
    and an erased node is skipped."""
    out = RuleOutcome()
    rules = list(rules)
    for node in list(graph.nodes):
        apply_rules_at(node, rules, ctx, out)
    return out


def apply_rules_at(node: fx.Node, rules: Iterable[Rule[Ctx]], ctx: Ctx, out: RuleOutcome | None = None) -> RuleOutcome:
    """Apply the rules (in the order given) to one node, recording into `out` (a new outcome by
    default): for a pass that visits its targets in an order of its own rather than the graph's."""
    out = RuleOutcome() if out is None else out
    for rule in rules:
        if getattr(node, "_erased", False):  # erased by an earlier rule (fx marks erased nodes)
            break
        if not any(r in rule.roots for r in _roots_of(node)) or not rule.match(node, ctx):
            continue
        reason = rule.check(node, ctx)
        if reason is not None:
            out.refused.append({"rule": rule.name, "node": node.name, "reason": reason})
            continue
        name = node.name
        record = rule.replace(node, ctx)
        out.applied.append({"rule": rule.name, "node": name, **record})
    return out
