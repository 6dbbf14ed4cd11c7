"""Models named on the command line: `--model MODULE:FACTORY`, or the built-in default.

A factory is any importable function returning `(model, example_inputs)`,
`(model, example_inputs, calibration)` or `(model, example_inputs, calibration, tokenizer)`;
this module turns such a reference into those four items (missing ones are None). It sits
at the tool layer (used by the CLI and `rewrite inspect`), above the compiler.

Example:
    >>> from rewrite.model_refs import load_factory
    >>> model, example, calibration, tokenizer = load_factory("rewrite.zoo_factories:bert")
    >>> type(model).__name__, tokenizer is None
    ('BertModel', True)
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from .errors import RewriteError


def load_factory(ref: str) -> tuple[Any, Any, Any, Any]:
    """(model, example_inputs, calibration, tokenizer) from `MODULE:FACTORY`; the current folder is importable."""
    if ":" not in ref:
        raise RewriteError(f"--model must look like MODULE:FACTORY (e.g. mypkg.models:build), got {ref!r}")
    mod_name, fn_name = ref.split(":", 1)
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise RewriteError(f"cannot import {mod_name!r} for --model: {exc}") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise RewriteError(f"{mod_name!r} has no attribute {fn_name!r} (from --model {ref})")
    got = fn()
    if isinstance(got, tuple):
        if 2 <= len(got) <= 4:
            return tuple(got) + (None,) * (4 - len(got))  # type: ignore[return-value]
        raise RewriteError(f"{ref} returned a tuple of {len(got)}; expected (model, inputs[, calibration[, tokenizer]])")
    raise RewriteError(f"{ref} returned only a model: return (model, example_inputs[, calibration]) so it can be captured")


def default_model(samples: int, batch_size: int, seed: int) -> tuple[Any, Any, Any, Any]:
    """The built-in default: all-MiniLM-L6-v2 with STS-B calibration sentences (the `demo` extra)."""
    from . import demo

    model, tok = demo.load_minilm()
    calib = demo.calibration_batches(tok, samples=samples, batch_size=batch_size, seed=seed)
    return model, demo.example_inputs(tok), calib, tok
