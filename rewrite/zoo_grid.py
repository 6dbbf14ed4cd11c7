"""The zoo grid: every pass kind on every zoo model, each cell ok, cleanly refused, or FAIL.

A cell compiles one zoo model with one pass through the public API (`rewrite.compile`), checks
that the rewrite changed the model the way its kind promises (fewer params/FLOPs for
pruning and skipping, fewer weight bytes for quantization, fewer FLOPs for token pruning),
exports it to ONNX and verifies it in onnxruntime. A `RewriteError` other than an export or
verification failure is a refusal: the compiler said why the pass does not apply. Anything
else (a crash, an export failure, a pass that reports success and changes nothing) is FAIL.

    python -m rewrite.zoo_grid -j 2            # the whole grid as a table (two worker processes)
    python -m rewrite.zoo_grid swin t5 -p tokens,prune_head
    python -m rewrite.zoo_grid --no-export     # passes only: a quick triage of crashes and no-ops
    python -m rewrite.zoo_grid --static        # fixed-shape export, ~2.5x cheaper than symbolic dims

Each cell logs its wall and CPU seconds as it finishes; CPU seconds are what a cell costs on an
idle machine (wall time on a shared one mostly measures the other processes).

Test and benchmark support (tests/test_zoo_grid.py), like `rewrite.zoo`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import zoo
from .errors import CaptureError, ExportError, RewriteError, VerificationError
from .measure import Cost

PASSES: dict[str, dict[str, Any]] = {
    "cleanup": {"kind": "cleanup"},
    "prune_head": {"kind": "prune", "granularity": "head", "amount": 0.25},
    "prune_neuron": {"kind": "prune", "granularity": "neuron", "amount": 0.25},
    "prune_channel": {"kind": "prune", "granularity": "channel", "amount": 0.25},
    "w4": {"kind": "quantize", "weights": {"bits": 4}},
    "w8a8": {"kind": "quantize", "weights": {"bits": 8}, "activations": {"mode": "dynamic"}},
    "skip1": {"kind": "skip", "layers": 1, "search": "greedy"},
    "tokens": {"kind": "token", "keep": 0.7},
}
"""Column name -> the one pass that cell compiles."""


def _fewer(*fields: str) -> Callable[[Cost, Cost], bool]:
    return lambda before, after: all(getattr(after, f) < getattr(before, f) for f in fields)


CHANGED: dict[str, Callable[[Cost, Cost], bool]] = {
    "cleanup": lambda before, after: True,  # cleanup may legitimately find nothing to remove
    "prune_head": _fewer("params", "flops"),
    "prune_neuron": _fewer("params", "flops"),
    "prune_channel": _fewer("params", "flops"),
    "w4": _fewer("weight_bytes"),
    "w8a8": _fewer("weight_bytes"),
    "skip1": _fewer("params", "flops"),
    "tokens": _fewer("flops"),
}
"""What 'the pass changed the model' means for each column."""


@dataclass
class Cell:
    model: str
    column: str
    outcome: str  # ok | refused | FAIL
    message: str = ""
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time: what the cell costs on an idle machine, load aside
    verified: bool = False  # exported and matched in onnxruntime (an ok cell run with export)

    def short(self, width: int = 60) -> str:
        msg = self.message.splitlines()[0] if self.message else ""
        return self.outcome if self.outcome == "ok" else f"{self.outcome}({msg[:width]})"


_CAPTURED: dict[str, tuple[zoo.ZooModel, Any]] = {}


def captured(model: str) -> tuple[zoo.ZooModel, Any]:
    """The zoo model and its capture, once per process: every column compiles a clone of it."""
    from .program import Program

    if model not in _CAPTURED:
        z = zoo.load(model, calibration_batches=3)
        _CAPTURED[model] = (z, Program.capture(z.model, z.example, name=model))
    return _CAPTURED[model]


def run_cell(model: str, column: str, workdir: Path | None = None, export: bool = True, dynamic: bool = True) -> Cell:
    """Compile `model` with the `column` pass, check the change, export and verify in onnxruntime.

    `export=False` stops after the change check (a quick triage of the passes alone);
    `dynamic=False` exports with the example's fixed shapes, about 2.5x cheaper than the
    symbolic batch/sequence export (the capture and passes stay dynamic either way)."""
    cpu = time.process_time()
    cell = _run_cell(model, column, workdir, export, dynamic)
    cell.cpu_seconds = time.process_time() - cpu
    return cell


def _run_cell(model: str, column: str, workdir: Path | None, export: bool, dynamic: bool) -> Cell:
    import rewrite

    start = time.perf_counter()
    spec = {"calibration": {"samples": 64, "batch_size": 2, "holdout": 0.34}, "passes": [PASSES[column]]}
    try:
        z, program = captured(model)
        out = rewrite.compile(program, spec, example_inputs=z.example, calibration=z.calibration)
    except (ExportError, VerificationError, CaptureError) as exc:
        return Cell(model, column, "FAIL", f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
    except RewriteError as exc:
        return Cell(model, column, "refused", f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - a crash is what the grid exists to find
        return Cell(model, column, "FAIL", f"crash {type(exc).__name__}: {exc}", time.perf_counter() - start)
    rep = out.report
    if not CHANGED[column](rep.before, rep.after):  # the pass manager raises on no-ops; a warning is no excuse
        return Cell(model, column, "FAIL", f"silent no-op: {rep.passes[-1].summary!r}; before {rep.before}, after {rep.after}",
                    time.perf_counter() - start)
    if not export:
        return Cell(model, column, "ok", "not exported; " + "; ".join(rep.warnings), time.perf_counter() - start)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        try:
            record = out.export(Path(tmp) / f"{model}.onnx", verify_inputs=out.verification_batches(), dynamic=dynamic)
        except Exception as exc:  # noqa: BLE001
            return Cell(model, column, "FAIL", f"export {type(exc).__name__}: {exc}", time.perf_counter() - start)
    note = "; ".join(rep.warnings)
    return Cell(model, column, "ok", note, time.perf_counter() - start, verified=record.verified)


def run_row(model: str, columns: list[str], log: bool = False, verbose: bool = False, export: bool = True,
            dynamic: bool = True) -> list[Cell]:
    """One model's cells (its capture is shared between them); `log` prints each cell as it finishes."""
    cells = []
    try:
        for col in columns:
            cells.append(run_cell(model, col, export=export, dynamic=dynamic))
            if log:
                _log(cells[-1], verbose)
        return cells
    finally:
        _CAPTURED.pop(model, None)


def _log(cell: Cell, verbose: bool) -> None:
    print(f"{cell.model:16s} {cell.column:14s} {cell.outcome:8s} {cell.seconds:5.1f}s {cell.cpu_seconds:5.1f}s CPU "
          f"{cell.message[:400] if verbose else ''}", file=sys.stderr, flush=True)


def _worker_init() -> None:
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(1)


def table(cells: list[Cell], width: int = 60) -> str:
    """Markdown: one row per model, one column per pass; refusals and failures with their reason."""
    models = list(dict.fromkeys(c.model for c in cells))
    columns = list(dict.fromkeys(c.column for c in cells))
    by = {(c.model, c.column): c for c in cells}
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for m in models:
        row = [by[(m, col)].short(width).replace("|", "/") if (m, col) in by else "" for col in columns]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    counts = {k: sum(c.outcome == k for c in cells) for k in ("ok", "refused", "FAIL")}
    lines.append("")
    lines.append(f"{len(cells)} cells: {counts['ok']} ok, {counts['refused']} refused, {counts['FAIL']} FAIL; "
                 f"{sum(c.seconds for c in cells):.0f} s of compile + export ({sum(c.cpu_seconds for c in cells):.0f} s CPU)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser(prog="python -m rewrite.zoo_grid", description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", help=f"zoo models (default: all {len(zoo.EVERY)})")
    ap.add_argument("-p", "--passes", default=",".join(PASSES), help="comma-separated columns")
    ap.add_argument("-w", "--width", type=int, default=60, help="characters of each refusal/failure reason")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    ap.add_argument("--no-export", action="store_true", help="compile and check the change only (quick triage)")
    ap.add_argument("--static", action="store_true", help="export with the example's fixed shapes (cheaper)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every cell's full message as it finishes")
    args = ap.parse_args(argv)
    import torch

    models, columns = args.models or list(zoo.EVERY), args.passes.split(",")
    cells: list[Cell] = []

    if args.jobs <= 1:
        torch.set_num_threads(2)
        for m in models:
            cells.extend(run_row(m, columns, True, args.verbose, not args.no_export, not args.static))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init) as pool:
            futures = [pool.submit(run_row, m, columns, True, args.verbose, not args.no_export, not args.static) for m in models]
            for fut in as_completed(futures):
                cells.extend(fut.result())
    order = {m: i for i, m in enumerate(models)}
    cells.sort(key=lambda c: order[c.model])
    print(table(cells, args.width))
    return 1 if any(c.outcome == "FAIL" for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
