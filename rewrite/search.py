"""`rewrite search`: sweep spec parameters, measure every combination, print the Pareto front.

    rewrite search SPEC --grid passes.0.amount=0.1,0.25,0.5 --grid passes.1.weights.bits=4,8
                   [--model MODULE:FACTORY] [--executor local|ray] [--max-drop 0.01] [--out DIR]

Each `--grid KEY=V1,V2,...` names a field of the spec by its path (list items by index)
and the values to try; every combination is compiled and measured: the accuracy proxy
(cosine drop of the outputs on held-back calibration batches), the weight size, and the
onnxruntime latency ratio (rewritten / original, measured side by side in the same
process, so combinations measured on different Ray workers stay comparable). The table
marks the Pareto front (no other combination is at least as good on all three and better
on one); the best spec (the lowest latency ratio, then size, within `--max-drop`) is
written to `OUT/best.yaml` and the table to `OUT/search.md`.

Example (Python):
    >>> from rewrite.search import grid_specs
    >>> specs = grid_specs({"passes": [{"kind": "prune", "granularity": "neuron", "amount": 0.1}]},
    ...                    ["passes.0.amount=0.25,0.5"])
    >>> [s["passes"][0]["amount"] for _, s in specs]
    [0.25, 0.5]
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import yaml

from .errors import SpecError
from .spec import Spec


@dataclass
class Point:
    """One measured combination of the grid."""

    setting: dict[str, Any]
    spec: dict[str, Any]
    cosine_drop: float = math.nan
    weight_mb: float = math.nan
    latency_ratio: float = math.nan
    error: str = ""
    pareto: bool = False


def _parse_grid(entry: str) -> tuple[str, list[Any]]:
    key, sep, values = entry.partition("=")
    if not sep or not key or not values:
        raise SpecError(f"--grid {entry!r}: write KEY=V1,V2,... (e.g. passes.0.amount=0.1,0.25)")
    return key.strip(), [yaml.safe_load(v.strip()) for v in values.split(",")]


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    """Set `value` at a dotted path (list items by index); the path must exist up to its last key."""
    node: Any = data
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        try:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        except (IndexError, ValueError):
            raise SpecError(f"--grid {path}: the spec has no {'.'.join(parts[:i + 1])}") from None
    last = parts[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (IndexError, ValueError):
            raise SpecError(f"--grid {path}: the spec has no {path}") from None
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise SpecError(f"--grid {path}: {'.'.join(parts[:-1])} is not a mapping or a list")


def grid_specs(base: dict[str, Any], grid: Sequence[str]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(setting, spec) for every combination, each spec validated before any work."""
    axes = [_parse_grid(g) for g in grid]
    if not axes:
        raise SpecError("rewrite search needs at least one --grid KEY=V1,V2,...")
    out = []
    for values in itertools.product(*(v for _, v in axes)):
        spec = copy.deepcopy(base)
        setting = {}
        for (key, _), value in zip(axes, values):
            _set(spec, key, value)
            setting[key] = value
        Spec.parse(spec)  # one SpecError line naming the bad field, before anything runs
        out.append((setting, spec))
    return out


def setup_state(model: Any, example: Any, calibration: Any) -> dict[str, Any]:
    """A worker's state: the model and data (each combination compiles its own copy)."""
    return {"model": model, "example": example, "calibration": calibration}


def measure_point(state: dict[str, Any], item: tuple[dict[str, Any], dict[str, Any]]) -> Point:
    """Compile one combination and measure drop, size and latency ratio (errors are kept, not raised)."""
    from .compiler import compile
    from .errors import RewriteError

    setting, spec = item
    point = Point(setting, spec)
    try:
        compiled = compile(copy.deepcopy(state["model"]), spec, example_inputs=state["example"],
                           calibration=state["calibration"], progress=False)
        latency = compiled.measure_latency(repeats=10, progress=False)
    except RewriteError as exc:
        point.error = str(exc).splitlines()[0]
        return point
    fid = compiled.report.fidelity
    point.cosine_drop = fid.cosine_drop if fid else 0.0
    point.weight_mb = compiled.report.after.weight_bytes / 1e6
    point.latency_ratio = latency.after_ms / latency.before_ms
    return point


def mark_pareto(points: list[Point]) -> None:
    """Flag the combinations that no other one beats on drop, size and latency together."""
    ok = [p for p in points if not p.error]
    for p in ok:
        key = (p.cosine_drop, p.weight_mb, p.latency_ratio)
        p.pareto = not any(
            all(a <= b for a, b in zip((q.cosine_drop, q.weight_mb, q.latency_ratio), key))
            and (q.cosine_drop, q.weight_mb, q.latency_ratio) != key for q in ok)


def best(points: list[Point], max_drop: float) -> Point | None:
    """The lowest latency ratio (then size) among the combinations within `max_drop`."""
    within = [p for p in points if not p.error and p.cosine_drop <= max_drop]
    return min(within, key=lambda p: (p.latency_ratio, p.weight_mb)) if within else None


def render(points: list[Point], chosen: Point | None) -> str:
    """The search table as Markdown: one row per combination, Pareto front and best marked."""
    keys = list(points[0].setting) if points else []
    head = keys + ["cosine drop", "weights MB", "latency ratio", "front"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        cells = [str(p.setting[k]) for k in keys]
        if p.error:
            cells += ["-", "-", "-", f"failed: {p.error}"]
        else:
            mark = ", ".join(m for m, on in (("best", p is chosen), ("pareto", p.pareto)) if on)
            cells += [f"{p.cosine_drop:.5f}", f"{p.weight_mb:.2f}", f"{p.latency_ratio:.3f}", mark]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def search(model: Any, example: Any, calibration: Any, base: dict[str, Any], grid: Sequence[str], *,
           executor: str | None = None, max_drop: float = 0.01) -> tuple[list[Point], Point | None]:
    """Measure every grid combination on `executor`; return the points (front marked) and the best."""
    from .executor import executor_for

    items = grid_specs(base, grid)
    points = executor_for(executor).map(setup_state, (model, example, calibration), measure_point, items,
                                        description="search: compiling combinations")
    mark_pareto(points)
    return points, best(points, max_drop)


def run_search(args: Any) -> int:
    """Entry point of `rewrite search` (see the module docstring)."""
    import sys
    from pathlib import Path

    from .model_refs import default_model, load_factory
    from .output_files import OutputFolder, check_writable
    from .progress import showing

    spec = Spec.load(args.spec)
    base = spec.model_dump(mode="json", exclude_unset=True)
    items = grid_specs(base, args.grid)  # validate every combination first
    out_dir = Path(args.out)
    check_writable(out_dir)
    with showing(not args.quiet), OutputFolder(out_dir).transaction() as out:
        if args.model:
            model, example, calib, _ = load_factory(args.model)
        else:
            model, example, calib, _ = default_model(spec.calibration.samples, spec.calibration.batch_size, spec.calibration.seed)
        print(f"search: {len(items)} combinations of {', '.join(k.split('=')[0] for k in args.grid)} "
              f"on the {args.executor} executor", file=sys.stderr)
        points, chosen = search(model, example, calib, base, args.grid, executor=args.executor, max_drop=args.max_drop)
        table = render(points, chosen)
        out.write_text("search.md", f"# rewrite search: {type(model).__name__}\n\n{table}")
        if chosen is not None:
            out.write_text("best.yaml", Spec.parse(chosen.spec).to_yaml())
    print(table)
    if chosen is None:
        print(f"no combination stays within --max-drop {args.max_drop}; nothing written to best.yaml", file=sys.stderr)
        return 1
    print(f"best within cosine drop {args.max_drop}: {chosen.setting} -> {out_dir / 'best.yaml'}", file=sys.stderr)
    return 0
