"""`rewrite.compare` streams: every number is a running statistic, so verification holds one
pair of outputs at a time (a 262k-vocabulary decoder's logits are 0.5 GB per 512 positions;
concatenated in float64 with their differences, Gemma-3's export check needed > 10 GB)."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from rewrite import compare as C


def _pairs(n: int = 5, size: int = 1000, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ref = torch.randn(size + 37 * i, generator=g) * (i + 1)
        out.append((ref, ref + 1e-3 * torch.randn(ref.shape, generator=g)))
    return out


@pytest.mark.parametrize("quantile", [1.0, 0.9])
def test_streamed_statistics_equal_the_concatenated_ones(quantile, monkeypatch):
    monkeypatch.setattr(C, "CHUNK", 256)  # several chunks per pair
    pairs = _pairs()
    got = C.compare(iter(pairs), rtol=1.0, quantile=quantile)
    x = torch.cat([r for r, _ in pairs]).double()
    y = torch.cat([g for _, g in pairs]).double()
    diff = (x - y).abs()
    scale = float(x.abs().max())
    want_checked = float(torch.quantile(diff.float(), quantile)) if quantile < 1 else float(diff.max())
    assert got.values == x.numel()
    assert got.max_abs == pytest.approx(float(diff.max()), rel=1e-12)
    assert got.max_rel == pytest.approx(float(diff.max()) / scale, rel=1e-12)
    assert got.checked_rel == pytest.approx(want_checked / scale, rel=1e-6)
    assert got.cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(x, y, dim=0)), abs=1e-12)
    assert got.rel_l2 == pytest.approx(float(diff.norm()) / max(float(x.norm()), float(y.norm())), rel=1e-9)


def test_compare_keeps_no_pair_alive_while_the_next_is_made():
    """A generator of pairs is consumed one at a time: when the next pair is produced, the
    previous one (and anything derived from it) is already freed."""
    alive: list[weakref.ref] = []

    def pairs():
        for i in range(4):
            (r, g), = _pairs(n=1, size=1 << 12, seed=i)  # made here: no list holds them
            gc.collect()
            assert all(w() is None for w in alive), "compare still holds an earlier pair"
            alive.extend([weakref.ref(r), weakref.ref(g)])
            yield r, g
            del r, g

    for quantile in (1.0, 0.9):
        alive.clear()
        assert C.compare(pairs(), rtol=1.0, quantile=quantile).values > 0
