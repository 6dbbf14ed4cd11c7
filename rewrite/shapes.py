"""Size arithmetic on captured shapes: example values of symbolic sizes, and how the dims of a
reshape line up (runs of input dims and output dims with equal products).

Canonicalisation uses it to re-express view sizes, dimension tracking (`rewrite.dims`) to map
elements through reshapes; both must agree, so the rule lives here, in the core.

Example:
    >>> from rewrite.shapes import group_dims
    >>> group_dims((2, 3, 4), (6, 4))   # [2, 3] merge into 6; 4 stays
    [([0, 1], [0]), ([2], [1])]
"""
from __future__ import annotations

from typing import Any

import sympy
import torch


def size_expr(size: Any) -> sympy.Expr:
    """A size as a sympy expression (symbolic sizes keep their symbol)."""
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return sympy.Integer(int(size))


def size_hint(size: Any) -> int:
    """A size's example value (raises for data-dependent sizes, which have none)."""
    if isinstance(size, torch.SymInt):
        return int(size.node.hint) if size.node.hint is not None else int(size.node.shape_env.size_hint(size.node.expr))
    return int(size)


def hinted(*shapes: Any) -> bool:
    """Every size has an example value. Data-dependent sizes (unbacked symbols, e.g. a length
    computed from tensor values, as in DeBERTa's relative positions) have none: size lists that
    involve them are left as captured."""
    for shape in shapes:
        for size in shape:
            try:
                size_hint(size)
            except Exception:  # noqa: BLE001 - torch raises GuardOnDataDependentSymNode (and kin)
                return False
    return True


def group_dims(in_shape: tuple, out_shape: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Runs of input dims and output dims with equal products, in order (None if not aligned, or
    if a size is data-dependent and has no example value to compare)."""
    if not hinted(in_shape, out_shape):
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    n_in, n_out = len(in_shape), len(out_shape)
    while i < n_in and j < n_out:
        gi, gj = [i], [j]
        pi, pj = size_expr(in_shape[i]), size_expr(out_shape[j])
        hi, hj = size_hint(in_shape[i]), size_hint(out_shape[j])
        i += 1
        j += 1
        while sympy.simplify(pi - pj) != 0:
            if hi <= hj and i < n_in:
                pi, hi = pi * size_expr(in_shape[i]), hi * size_hint(in_shape[i])
                gi.append(i)
                i += 1
            elif j < n_out:
                pj, hj = pj * size_expr(out_shape[j]), hj * size_hint(out_shape[j])
                gj.append(j)
                j += 1
            else:
                return None
        groups.append((gi, gj))
    # trailing size-1 dims join the last run
    if groups:
        groups[-1][0].extend(range(i, n_in))
        groups[-1][1].extend(range(j, n_out))
    elif n_in or n_out:
        return None
    return groups
