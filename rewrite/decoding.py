"""Generation runtime: greedy or top-k/top-p sampling over a generation graph's KV cache.

The loop is written once against a `Stepper` (one call of the graph: new tokens, the mask
over past + new, the past -> logits and present), so the rewritten torch module and an
onnxruntime session (`backends.onnx_generation.OrtStepper`) generate through the same code,
and the export check compares them token for token.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from .errors import RewriteError
from .generation import CacheLayout, GenerationProgramInfo, step_inputs

Past = list[tuple[torch.Tensor, torch.Tensor]]


class GenerationError(RewriteError, ValueError):
    """Bad input to a generation call (prompt too long, mismatched mask, no past)."""


class Stepper(Protocol):
    layout: CacheLayout

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: Past) -> tuple[torch.Tensor, Past]:
        ...


def check_step(layout: CacheLayout, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: Past | None) -> None:
    """One clear line for inputs the graph would otherwise fail on (or silently get wrong)."""
    if input_ids.dim() != 2 or attention_mask.dim() != 2:
        raise GenerationError(f"input_ids and attention_mask must be batch x tokens, got shapes "
                              f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    if attention_mask.shape[0] != input_ids.shape[0]:
        raise GenerationError(f"attention_mask has batch {attention_mask.shape[0]} but input_ids has batch "
                              f"{input_ids.shape[0]}: give one mask row per sequence")
    if past is None:
        raise GenerationError("a generation step needs the past keys and values (the presents of the previous call); "
                              "for the first call (prefill) pass an empty past, e.g. layout.empty_past(batch)")
    if len(past) != layout.num_layers:
        raise GenerationError(f"past has {len(past)} layers, the graph expects {layout.num_layers}")
    n_past = int(past[0][0].shape[2]) if past else 0
    if attention_mask.shape[1] != n_past + input_ids.shape[1]:
        raise GenerationError(f"attention_mask covers {attention_mask.shape[1]} tokens but past ({n_past}) + new "
                              f"({input_ids.shape[1]}) is {n_past + input_ids.shape[1]}: the mask spans past and new tokens")
    if layout.max_positions and attention_mask.shape[1] > layout.max_positions:
        raise GenerationError(f"{attention_mask.shape[1]} tokens exceed the model's {layout.max_positions} positions: "
                              "shorten the prompt or lower max_new_tokens")


class TorchStepper:
    """A generation graph in torch (a GraphModule or a `Compiled`) as a `Stepper`."""

    def __init__(self, module: Callable[..., Any], layout: CacheLayout):
        self.module = module
        self.layout = layout

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: Past) -> tuple[torch.Tensor, Past]:
        check_step(self.layout, input_ids, attention_mask, past)
        with torch.no_grad():
            out = step_inputs(self.layout, input_ids, attention_mask, past).call(self.module)
        present = [(out[f"present.{i}.key"], out[f"present.{i}.value"]) for i in range(self.layout.num_layers)]
        return out["logits"], present


@dataclass
class Sampling:
    """How the next token is chosen: greedy (argmax) unless do_sample."""

    do_sample: bool = False
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0
    seed: int | None = None

    def chooser(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if not self.do_sample:
            return lambda logits: logits.argmax(-1)
        if self.temperature <= 0:
            raise GenerationError(f"temperature must be > 0 when sampling (got {self.temperature})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1] (got {self.top_p})")
        gen = torch.Generator().manual_seed(self.seed if self.seed is not None else 0)

        def choose(logits: torch.Tensor) -> torch.Tensor:
            scores = logits.double() / self.temperature
            if self.top_k:
                kth = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if self.top_p is not None and self.top_p < 1:
                sorted_scores, order = scores.sort(dim=-1, descending=True)
                probs = sorted_scores.softmax(-1)
                drop = probs.cumsum(-1) - probs > self.top_p  # keep the smallest set reaching top_p
                scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
            return torch.multinomial(scores.softmax(-1).float(), 1, generator=gen).squeeze(-1)

        return choose


def generate_ids(stepper: Stepper, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 32, sampling: Sampling | None = None, eos_token_ids: list[int] | None = None,
                 stream: Callable[[torch.Tensor], Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill the (left-padded) prompts, then decode one token at a time with the cache.

    Returns (new token ids [batch x n], prefill logits). `stream` gets each step's tokens.
    Sequences that produced an EOS keep emitting EOS until all have, then the loop stops.
    """
    layout = stepper.layout
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    choose = (sampling or Sampling()).chooser()
    eos = torch.tensor(eos_token_ids if eos_token_ids is not None else layout.eos_token_ids, dtype=torch.long)
    if layout.max_positions and input_ids.shape[1] + max_new_tokens > layout.max_positions:
        raise GenerationError(f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                              f"model's {layout.max_positions} positions: shorten the prompt or lower max_new_tokens")
    check_step(layout, input_ids, attention_mask, layout.empty_past(input_ids.shape[0]))
    mask = attention_mask.long()
    logits, past = stepper(input_ids, mask, layout.empty_past(input_ids.shape[0]))
    prefill_logits = logits
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    out: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = choose(logits[:, -1, :])
        if eos.numel():
            token = torch.where(done, eos[0], token)
            done |= torch.isin(token, eos)
        out.append(token)
        if stream is not None:
            stream(token)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits, past = stepper(token[:, None], mask, past)
    tokens = torch.stack(out, 1) if out else input_ids.new_zeros(input_ids.shape[0], 0)
    return tokens, prefill_logits


# ----------------------------------------------------------------------- user-facing API
def stepper_for(model_or_path: Any, **session_options: Any) -> Stepper:
    """A Stepper for a `Compiled`, a generation GraphModule + layout, or an ONNX file path."""
    if isinstance(model_or_path, (str, os.PathLike)):
        from backends.onnx_generation import OrtStepper

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
