"""Calibration data from a file, for the command line (`rewrite compile --calibration FILE`).

Text models with a tokenizer take text: a `.txt` file (one sample a line) or `.jsonl` (one
JSON object a line, its `text` field, or a bare JSON string). Any model takes a `.pt` file
saved with `torch.save`: a list of batches shaped like the example inputs (each a dict of
tensors, a tuple, or one tensor), or one such batch. Batches are then checked against the
example inputs like any calibration given to `rewrite.compile`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import CalibrationError, first_line
from .inputs import Inputs

TEXT_SUFFIXES = {".txt", ".text", ".jsonl"}
TENSOR_SUFFIXES = {".pt", ".pth"}


def load_calibration_file(path: str | Path, example: Inputs, *, tokenizer: Any = None, samples: int = 128,
                          batch_size: int = 16, max_length: int = 128) -> list[Any]:
    """Batches from `path` (see the module docstring); a CalibrationError names what is wrong and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"--calibration {path}: no such file")
    suffix = path.suffix.lower()
    if suffix in TENSOR_SUFFIXES:
        return _tensor_batches(path)
    if suffix in TEXT_SUFFIXES:
        if tokenizer is None:
            raise CalibrationError(
                f"--calibration {path} is text, but this model has no tokenizer: give a .pt file of batches "
                "(torch.save of a list of inputs shaped like example_inputs), or return (model, example_inputs, "
                "calibration, tokenizer) from the --model factory")
        texts = _texts(path, samples)
        return [tokenize_like(tokenizer, texts[i : i + batch_size], example, max_length)
                for i in range(0, len(texts), batch_size)]
    raise CalibrationError(f"--calibration {path}: unknown file type {suffix or '(none)'}; use .txt or .jsonl (text, "
                           "one sample a line) or .pt (torch.save of a list of batches)")


def _tensor_batches(path: Path) -> list[Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        first = first_line(exc)
        raise CalibrationError(f"--calibration {path} cannot be read by torch.load (tensors, lists, tuples and dicts only): {first}") from None
    if isinstance(data, (torch.Tensor, dict)) or (isinstance(data, tuple) and data and isinstance(data[0], torch.Tensor)):
        return [data]  # one batch
    if isinstance(data, (list, tuple)) and data:
        return list(data)
    raise CalibrationError(f"--calibration {path} holds a {type(data).__name__}; expected a non-empty list of batches")


def _texts(path: Path, samples: int) -> list[str]:
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix.lower() == ".jsonl":
                line = _jsonl_text(path, lineno, line)
            texts.append(line)
            if len(texts) >= samples:
                break
    if not texts:
        raise CalibrationError(f"--calibration {path} has no text lines")
    return texts


def _jsonl_text(path: Path, lineno: int, line: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"--calibration {path} line {lineno} is not JSON: {exc.msg}") from None
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return obj["text"]
    raise CalibrationError(f"--calibration {path} line {lineno}: expected an object with a string 'text' field (or a JSON string)")


def tokenize_like(tokenizer: Any, texts: list[str], example: Inputs, max_length: int = 128) -> Inputs:
    """Tokenize `texts` into the keyword inputs the example uses (input_ids, attention_mask, ...)."""
    if example.args or not example.kwargs:
        raise CalibrationError("text calibration needs a model called with keyword inputs (input_ids=..., attention_mask=...)")
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    missing = [k for k in example.kwargs if k not in enc]
    if missing:
        raise CalibrationError(f"the tokenizer does not produce the model inputs {missing} (it gives {sorted(enc.keys())})")
    return Inputs((), {k: enc[k].to(example.kwargs[k].dtype) if isinstance(example.kwargs[k], torch.Tensor) else enc[k]
                       for k in example.kwargs})
