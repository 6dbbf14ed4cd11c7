"""The importance kinds: one registry, one decorator per kind.

A kind is a scoring function registered under its group and spec name with `@importance`:

    @importance("layer", "outlier_fraction")
    def _outlier_fraction(program, regions, batches, original): ...

The registry is what everything else reads: the spec's field types (`literal("weight")` is the
`Literal[...]` of the registered weight kinds, so an unknown kind is a spec error listing the
valid ones), the dispatchers (`weight_scores`, `score_regions`, `score_tokens` look the function
up here), and `rewrite inspect`'s lists. Adding a kind is one decorated function.

Groups and the signature each group's functions share:
- "weight": scores shaped like a weight; `source` says what the function reads:
  "weights" `fn(w) -> tensor`, "stats" `fn(op, w, input_stats) -> tensor`, "gradients" (taylor,
  computed by `gradients.taylor_scores`); `alias_of` names another kind (magnitude = magnitude_l2);
  `roles` restricts the group members that carry the score (wina: consumers only).
- "layer": `fn(program, regions, batches, original) -> {region key: score}`.
- "token": `fn(q, k, mask, hidden, valid, scale=, is_causal=, query=) -> [batch, tokens]`, in the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

GROUPS = ("weight", "layer", "token")


@dataclass(frozen=True)
class Kind:
    """One registered importance kind."""

    name: str
    group: str
    fn: Callable[..., Any] | None
    source: str = ""
    """weight kinds: "weights", "stats" or "gradients" (what the score is computed from)."""
    alias_of: str | None = None
    roles: tuple[str, ...] | None = None


REGISTRY: dict[str, dict[str, Kind]] = {g: {} for g in GROUPS}
"""{group: {name: Kind}} in registration order (the order error messages and tables list them in)."""


def importance(group: str, name: str, *, source: str = "", alias_of: str | None = None,
               roles: tuple[str, ...] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register `fn` as the importance kind `name` of `group`."""
    if group not in REGISTRY:
        raise ValueError(f"unknown importance group {group!r}; groups: {', '.join(GROUPS)}")

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        REGISTRY[group][name] = Kind(name, group, fn, source, alias_of, roles)
        return fn

    return add


def alias(group: str, name: str, of: str) -> None:
    """Register `name` as another spelling of the kind `of` (e.g. magnitude = magnitude_l2; `of` may come later)."""
    REGISTRY[group][name] = Kind(name, group, None, alias_of=of)


def names(group: str) -> tuple[str, ...]:
    """The registered kinds of `group`, in registration order."""
    return tuple(REGISTRY[group])


def get(group: str, name: str) -> Kind:
    """The kind `name` of `group`, following an alias; KeyError if it is not registered."""
    kind = REGISTRY[group][name]
    return REGISTRY[group][kind.alias_of] if kind.alias_of else kind


def literal(*groups: str) -> Any:
    """`Literal[...]` of the kinds registered in `groups` (a spec field's type)."""
    return Literal[tuple(n for g in groups for n in names(g))]  # type: ignore[valid-type]
