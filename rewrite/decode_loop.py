"""The decoding loop: greedy or top-k/top-p sampling over a generation graph's KV cache.

The loop is written once against a `Stepper` (one call of the graph: new tokens, the mask
over past + new, the past -> logits and present), so the rewritten torch module and an
onnxruntime session (`backends.onnx_generation.OrtStepper`) generate through the same code,
and the export check compares them token for token. This is the core's part (backends use
it to verify); the user-facing `rewrite.generate` with tokenizers and streaming is in
`rewrite.decoding`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from .errors import RewriteError
from .generation import CacheLayout, step_inputs

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
        present = [(out[k], out[v]) for k, v in self.layout.present_keys()]
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
