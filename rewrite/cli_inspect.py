"""`rewrite inspect` on the command line: load a model, capture it, and write importance tables.

The analysis itself (`inspect_program`, `render`, `plot`) is a pure function of a captured
program and calibration batches in `passes.importance.inspect`; this module is the tool layer
around it (model loading, files, printing), so the importance code never imports the CLI.

Example (writes `out/importance.md`, `out/importance.json` and plots):
    rewrite inspect --model rewrite.zoo_factories:bert --importance wanda --out out
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rewrite.passes.importance.inspect import jsonable, try_groups, inspect_program, kinds_from, plot, render

from .calibration import CalibrationData
from .errors import RewriteError
from .inputs import Inputs
from .model_refs import default_model, load_factory
from .program import Program
from .spec import Spec


def run_inspect(args: Any) -> int:
    """Entry point of `rewrite inspect`: load the model, capture, score, print and write the tables."""
    spec = Spec.load(args.spec) if getattr(args, "spec", None) else None
    kinds = kinds_from(spec, getattr(args, "importance", None))
    calib_spec = spec.calibration if spec is not None else Spec().calibration
    tokenizer = None
    if getattr(args, "model", None):
        model, example, calib, _ = load_factory(args.model)
    else:
        model, example, calib, tokenizer = default_model(calib_spec.samples, calib_spec.batch_size, calib_spec.seed)
    example = Inputs.of(example)
    print(f"inspecting {type(model).__name__}: weight {kinds['weight']}, layer {kinds['layer']}, token {kinds['token']}",
          file=sys.stderr)
    program = Program.capture(model, example)
    data = CalibrationData.from_user(calib, example, samples=calib_spec.samples, holdout=calib_spec.holdout)
    if getattr(args, "groups", False):
        groups, why = try_groups(program)
        if groups is None:
            raise RewriteError(why)
        from rewrite.dims import describe

        print(describe(groups))
    result = inspect_program(program, data.batches, kinds, holdout=data.holdout, tokenizer=tokenizer)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = render(result["tables"])
    if result["notes"]:
        text += "\n" + "\n".join(f"- {n}" for n in result["notes"]) + "\n"
    (out_dir / "importance.md").write_text(f"# importance: {type(model).__name__}\n\n" + text, encoding="utf-8")
    (out_dir / "importance.json").write_text(json.dumps(jsonable(result["tables"]), indent=1), encoding="utf-8")
    print(text)
    written = plot(result, out_dir)
    print(f"wrote {out_dir / 'importance.md'}, {out_dir / 'importance.json'}"
          + "".join(f", {p}" for p in written), file=sys.stderr)
    return 0
