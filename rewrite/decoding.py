"""Generation runtime for users: `rewrite.generate` over a compiled model or an exported ONNX file.

Tokenizes prompts, drives the decoding loop of `rewrite.decode_loop` through the rewritten
torch module or an onnxruntime session (`backends.onnx_generation.OrtStepper`), and streams
text pieces as tokens arrive.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .decode_loop import (  # noqa: F401  (re-exported: the loop's names are part of this API)
    GenerationError, Past, Sampling, Stepper, TorchStepper, check_step, generate_ids)
from .generation import CacheLayout, GenerationProgramInfo


# ----------------------------------------------------------------------- user-facing API
def stepper_for(model_or_path: Any, **session_options: Any) -> Stepper:
    """A Stepper for a `Compiled`, a generation GraphModule + layout, or an ONNX file path."""
    if isinstance(model_or_path, (str, os.PathLike)):
        from rewrite.backends.onnx_generation import OrtStepper

        return OrtStepper(Path(model_or_path), **session_options)
    program = getattr(model_or_path, "program", None)
    if program is not None:
        layout = GenerationProgramInfo.of(program)
        if layout is None:
            raise GenerationError("this model was compiled as a full-sequence graph: compile it with "
                                  "task='text-generation' to generate with a KV cache")
        return TorchStepper(program.module, layout)
    if hasattr(model_or_path, "layout") and callable(model_or_path):
        return model_or_path
    raise GenerationError(f"cannot generate with a {type(model_or_path).__name__}: give a Compiled from "
                          "rewrite.compile(..., task='text-generation') or the path of an exported ONNX file")


def generate(model_or_onnx_path: Any, tokenizer: Any, prompt: str | list[str], *, max_new_tokens: int = 32,
             do_sample: bool = False, top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0,
             seed: int | None = None, stream: Callable[[str], Any] | bool | None = None) -> str | list[str] | Iterator[str]:
    """Generate text from a compiled generation graph or an exported ONNX file.

    `stream`: a callback that receives each new piece of text as it is decoded, or True to
    get an iterator of pieces instead of the finished text.
    """
    stepper = stepper_for(model_or_onnx_path)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if stream is True:
        if len(prompts) != 1:
            raise GenerationError("streaming generates one prompt at a time: pass a single string")
        return _stream_iter(stepper, tokenizer, prompts[0], max_new_tokens,
                            Sampling(do_sample, top_k, top_p, temperature, seed))
    ids, mask = _encode(tokenizer, prompts)
    callback = None
    if callable(stream):
        callback = _TextStream(tokenizer, stream)
    tokens, _ = generate_ids(stepper, ids, mask, max_new_tokens=max_new_tokens,
                             sampling=Sampling(do_sample, top_k, top_p, temperature, seed),
                             eos_token_ids=_eos(tokenizer, stepper.layout), stream=callback)
    texts = [tokenizer.decode(_until_eos(row, _eos(tokenizer, stepper.layout)), skip_special_tokens=True)
             for row in tokens.tolist()]
    return texts[0] if isinstance(prompt, str) else texts


def _stream_iter(stepper: Stepper, tokenizer: Any, prompt: str, max_new_tokens: int, sampling: Sampling) -> Iterator[str]:
    import queue
    import threading

    q: queue.Queue = queue.Queue()
    ids, mask = _encode(tokenizer, [prompt])
    error: list[BaseException] = []

    def run() -> None:
        try:
            generate_ids(stepper, ids, mask, max_new_tokens=max_new_tokens, sampling=sampling,
                         eos_token_ids=_eos(tokenizer, stepper.layout), stream=_TextStream(tokenizer, q.put))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            error.append(exc)
        finally:
            q.put(None)

    threading.Thread(target=run, daemon=True).start()
    while (piece := q.get()) is not None:
        yield piece
    if error:
        raise error[0]


class _TextStream:
    """Turns streamed token ids (batch 1) into new text pieces (decoding the whole tail keeps
    multi-token characters and word spacing right)."""

    def __init__(self, tokenizer: Any, sink: Callable[[str], Any]):
        self.tokenizer, self.sink, self.ids, self.text = tokenizer, sink, [], ""

    def __call__(self, token: torch.Tensor) -> None:
        tid = int(token[0])
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if tid == eos:
            return
        self.ids.append(tid)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        piece, self.text = text[len(self.text):], text
        if piece:
            self.sink(piece)


def _encode(tokenizer: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    side = getattr(tokenizer, "padding_side", "left")
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        tokenizer.padding_side = "left"  # decoding appends on the right
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"], enc["attention_mask"]


def _eos(tokenizer: Any, layout: CacheLayout) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = list(layout.eos_token_ids)
    if eos is not None and eos not in ids:
        ids.append(int(eos))
    return ids


def _until_eos(row: list[int], eos: list[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[:i]
    return row
