"""Capture, cleanup and ONNX export time per zoo model (and all-MiniLM-L6-v2 when installed).

    python benchmarks/capture.py [--models bert,resnet] [--no-minilm]
"""
from __future__ import annotations

import os as _os
import sys as _sys

# Run as a script, this folder is sys.path[0] and benchmarks/token.py would shadow the
# standard library's `token` module: drop the folder, keep the repo root importable.
_HERE = _os.path.dirname(_os.path.abspath(__file__))
_sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _HERE] + [_os.path.dirname(_HERE)]

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

import rewrite
from rewrite.passes.canonicalize import canonicalize
from rewrite import Program, zoo

warnings.filterwarnings("ignore")


def measure(name: str, model: torch.nn.Module, example, calibration, out: Path) -> list[str]:
    t0 = time.perf_counter()
    program = Program.capture(model, example)
    canonicalize(program)
    t_capture = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = rewrite.compile(model, {"passes": [{"kind": "cleanup"}]}, example_inputs=example, calibration=calibration)
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec = compiled.export(out / f"{name}.onnx")
    t_export = time.perf_counter() - t0
    nodes = sum(1 for n in program.graph.nodes if n.op == "call_function")
    return [name, str(nodes), f"{t_capture:.2f}", f"{t_compile:.2f}", f"{t_export:.2f}", f"{rec.bytes / 1e6:.2f}", f"{rec.rel_error:.1e}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(zoo.ALL))
    ap.add_argument("--no-minilm", action="store_true")
    args = ap.parse_args()
    rows = [["model", "ATen ops", "capture s", "compile(cleanup) s", "export+verify s", "ONNX MB", "ORT rel err"]]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            z = zoo.load(name)
            rows.append(measure(name, z.model, z.example, z.calibration, Path(tmp)))
            print(" | ".join(rows[-1]), flush=True)
        if not args.no_minilm:
            try:
                from rewrite import demo

                model, tok = demo.load_minilm()
                rows.append(measure("all-MiniLM-L6-v2", model, demo.example_inputs(tok),
                                    demo.calibration_batches(tok, 32, 16), Path(tmp)))
            except ImportError as exc:
                print(f"(skipping all-MiniLM-L6-v2: {exc})")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for i, r in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    main()
