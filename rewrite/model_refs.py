"""Models named on the command line: `--model MODULE:FACTORY`, `--model hf:DIR`, or the built-in default.

A factory is any importable function returning `(model, example_inputs)`,
`(model, example_inputs, calibration)` or `(model, example_inputs, calibration, tokenizer)`;
this module turns such a reference into those four items (missing ones are None). `hf:DIR`
is a Hugging Face checkpoint folder (config.json + safetensors, read by `rewrite.load_hf`),
with its tokenizer when the folder has one. It sits at the tool layer (used by the CLI and
`rewrite inspect`), above the compiler.

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

from .errors import RewriteError, first_line


def load_factory(ref: str) -> tuple[Any, Any, Any, Any]:
    """(model, example_inputs, calibration, tokenizer) from `MODULE:FACTORY` (the current folder is
    importable) or from `hf:DIR` (`load_checkpoint_folder`)."""
    if ref.startswith("hf:"):
        return load_checkpoint_folder(ref[3:])
    if ":" not in ref:
        raise RewriteError(f"--model must look like MODULE:FACTORY (e.g. mypkg.models:build) or hf:DIR "
                           f"(a checkpoint folder), got {ref!r}")
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


def load_checkpoint_folder(directory: str) -> tuple[Any, Any, Any, Any]:
    """(model, example_inputs, None, tokenizer) for `--model hf:DIR`.

    The weights are read into memory as float32 (`load_hf(DIR).module()`): this is the path for
    checkpoints that fit; larger ones go block by block through `rewrite.sequential`. The example
    is one tokenized sentence when the folder has a tokenizer, else 8 token ids (text models) or
    one image of the config's size (vision models). Calibration comes from `--calibration FILE`.
    """
    import torch

    from .checkpoint import load_hf

    ckpt = load_hf(directory)
    model = ckpt.module().eval()
    tokenizer = tokenizer_of(Path(directory))
    return model, folder_example(directory, model.config, tokenizer, type(model).__name__), None, tokenizer


def folder_example(directory: str, config: Any, tokenizer: Any, model_name: str) -> dict[str, Any]:
    """The example inputs of a checkpoint folder's model, from its config and tokenizer (no weights read).

    One tokenized sentence when the folder has a tokenizer, else 8 token ids (text models) or
    one image of the config's size (vision models).
    """
    import torch

    if tokenizer is not None:  # the same example sentence as the packaged LLMs (`rewrite.models`)
        from .models import example_inputs

        return example_inputs(tokenizer)
    text = getattr(config, "get_text_config", lambda: config)()
    if getattr(text, "vocab_size", None):
        ids = (torch.arange(8) * 7 + 1).remainder(text.vocab_size).unsqueeze(0)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if size and channels:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        pixels = torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(0))
        return {"pixel_values": pixels}
    raise RewriteError(f"hf:{directory}: cannot make example inputs for {model_name} (no tokenizer, "
                       "vocab_size or image_size in its config): write a MODULE:FACTORY that returns them")


def tokenizer_of(directory: Path) -> Any:
    """The folder's tokenizer, or None when it has none (tokenizer.json / tokenizer_config.json)."""
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise RewriteError(f"hf:{directory}: cannot load its tokenizer: {first}") from None
