"""Wikipedia text for LLM calibration and perplexity, exactly as `../shared/data/wiki/README.md` says.

One recipe everywhere, so numbers compare across benchmarks and engineers:
- calibration: tokenise all of `wiki-train.txt` with the model's tokenizer (default special
  tokens), cut into consecutive 512-token chunks, take chunk `i * n_chunks // 128`, i = 0..127;
- perplexity: tokenise all of `wiki-dev.txt`, keep the first N = 32768 tokens, cut into
  non-overlapping 512-token windows scored on their own (the first token of a window is not
  predicted), mean NLL over the N - N/512 predicted tokens, ppl = exp(mean).

Token ids are cached next to the converted model (see `rewrite.cache.cache_dir`) because
tokenising 2 MB of text costs seconds on every run.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

WINDOW = 512
PPL_TOKENS = 32768
CALIB_CHUNKS = 128


def wiki_dir() -> Path:
    """`../shared/data/wiki` beside the repo (or `$REWRITE_WIKI`)."""
    env = os.environ.get("REWRITE_WIKI")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [p / "shared" / "data" / "wiki" for p in here.parents[:4]]
    candidates += [Path.cwd().parent / "shared" / "data" / "wiki", Path.cwd() / "shared" / "data" / "wiki"]
    for c in candidates:
        if (c / "wiki-train.txt").is_file() and (c / "wiki-dev.txt").is_file():
            return c
    raise FileNotFoundError("wiki text not found: expected ../shared/data/wiki/wiki-{train,dev}.txt beside the repo, "
                            "or set REWRITE_WIKI to the folder that holds them")


def wiki_text(split: str) -> str:
    if split not in ("train", "dev"):
        raise ValueError(f"wiki split must be 'train' or 'dev', got {split!r}")
    return (wiki_dir() / f"wiki-{split}.txt").read_text(encoding="utf-8")


def _token_cache_path(tokenizer: Any, split: str) -> Path | None:
    from .cache import cache_dir

    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    path = wiki_dir() / f"wiki-{split}.txt"
    key = hashlib.sha1(f"{name}|{type(tokenizer).__name__}|{len(tokenizer)}|{path.stat().st_size}".encode()).hexdigest()[:16]
    return cache_dir() / "tokens" / f"wiki-{split}-{key}.pt"


def wiki_tokens(tokenizer: Any, split: str) -> torch.Tensor:
    """The whole split tokenised with the tokenizer's default special tokens, as a 1-D int64 tensor."""
    cached = _token_cache_path(tokenizer, split)
    if cached is not None and cached.is_file():
        return torch.load(cached)
    ids = torch.tensor(tokenizer(wiki_text(split))["input_ids"], dtype=torch.long)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        torch.save(ids, tmp)
        os.replace(tmp, cached)
    return ids


def calibration_chunks(tokenizer: Any, n: int = CALIB_CHUNKS, length: int = WINDOW, split: str = "train") -> torch.Tensor:
    """`n` chunks of `length` tokens spread evenly over the split: chunk `i * n_chunks // n` ([n, length])."""
    ids = wiki_tokens(tokenizer, split)
    n_chunks = ids.numel() // length
    if n_chunks < n:
        raise ValueError(f"wiki-{split} has only {n_chunks} chunks of {length} tokens; asked for {n}")
    chunks = ids[: n_chunks * length].view(n_chunks, length)
    return chunks[[i * n_chunks // n for i in range(n)]].clone()


def calibration_batches(tokenizer: Any, n: int = CALIB_CHUNKS, length: int = WINDOW, batch_size: int = 8,
                        split: str = "train") -> list[dict[str, torch.Tensor]]:
    """The calibration chunks as `{"input_ids", "attention_mask"}` batches (no padding: every token is real)."""
    chunks = calibration_chunks(tokenizer, n, length, split)
    return [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in chunks.split(batch_size)]


def ppl_windows(tokenizer: Any, n_tokens: int = PPL_TOKENS, window: int = WINDOW, split: str = "dev") -> torch.Tensor:
    """The first `n_tokens` of the split as non-overlapping windows ([n_tokens // window, window])."""
    if n_tokens % window:
        raise ValueError(f"n_tokens ({n_tokens}) must be a multiple of the window ({window})")
    ids = wiki_tokens(tokenizer, split)
    if ids.numel() < n_tokens:
        raise ValueError(f"wiki-{split} has {ids.numel()} tokens, fewer than n_tokens={n_tokens}")
    return ids[:n_tokens].view(-1, window).clone()


def logits_of(output: Any) -> torch.Tensor:
    """The logits of an HF-style output: `.logits`, `["logits"]`, or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        return output["logits"]
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed NLL (float64) of tokens 1.. of each window given the previous ones, and how many were predicted."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return float(nll.double().sum()), nll.numel()


def perplexity(model: Callable[..., Any] | Any, tokenizer: Any, n_tokens: int = PPL_TOKENS, window: int = WINDOW,
               batch_size: int = 1, split: str = "dev",
               forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """The recipe's perplexity of `model` (a module called with input_ids/attention_mask) or of `forward(ids) -> logits`."""
    windows = ppl_windows(tokenizer, n_tokens, window, split)
    if forward is None:
        def forward(ids: torch.Tensor) -> torch.Tensor:
            return logits_of(model(input_ids=ids, attention_mask=torch.ones_like(ids)))
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in windows.split(batch_size):
            s, c = window_nll(forward(batch), batch)
            total, count = total + s, count + c
    assert count == n_tokens - n_tokens // window
    return math.exp(total / count)

