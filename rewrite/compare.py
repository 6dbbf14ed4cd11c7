"""One way to compare a reference output with another: fidelity, ONNX and TVM verification.

Every place that asks "do these outputs agree?" (the fidelity measured after each pass, the
onnxruntime check on export, the generation check, the TVM check) calls `compare`, so a
number in the report means the same thing wherever it comes from:

- `max_abs`: the largest absolute difference over all float values compared;
- `max_rel`: `max_abs` over the largest reference magnitude (a per-value ratio would be
  noise where outputs are ~0 by construction, like the mean of a LayerNorm);
- `checked_rel`: the `quantile` of the absolute differences over that same scale (1.0: the
  largest), the number held against `rtol`;
- `cosine` and `rel_l2`: over all float values concatenated (1.0 and 0.0 when identical).

Integer outputs must be equal; shapes must match, or (fidelity after token pruning, where
a sequence output legitimately shrinks) such pairs are skipped and `compared` says so.

Example:
    >>> import torch
    >>> from rewrite.compare import compare
    >>> ref = torch.tensor([1.0, -2.0, 4.0])
    >>> got = ref + torch.tensor([0.0, 0.0, 0.004])
    >>> a = compare([(ref, got)], rtol=2e-3)
    >>> round(a.max_rel, 6), a.ok
    (0.001, True)
    >>> compare([(ref, got)], rtol=1e-4).ok
    False
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from .errors import VerificationError


@dataclass(frozen=True)
class Agreement:
    """How closely `got` follows the reference (see the module docstring for each number)."""

    max_abs: float
    max_rel: float
    checked_rel: float
    cosine: float
    rel_l2: float
    rtol: float
    quantile: float
    values: int
    compared: str

    @property
    def ok(self) -> bool:
        """True when the checked relative error is within `rtol`."""
        return self.checked_rel <= self.rtol

    def check(self, backend: str, subject: str = "the rewritten torch module", consequence: str = "") -> "Agreement":
        """Raise one VerificationError line naming the backend, the error and the tolerance, unless ok."""
        if not self.ok:
            what = "max relative error" if self.quantile >= 1.0 else f"relative error at the {self.quantile:.0%} quantile"
            raise VerificationError(f"{backend} does not match {subject}: {what} {self.checked_rel:.2e} > tolerance "
                                    f"{self.rtol:.0e} (max abs error {self.max_abs:.2e}){consequence}")
        return self


def _tensor(x: Any) -> torch.Tensor:
    return x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


CHUNK = 1 << 22
"""Values converted to float64 at a time: the statistics are running sums and maxima, so the
comparison holds one chunk in double precision, never the outputs concatenated (a decoder's
logits over a 262k-token vocabulary are 0.5 GB per 512 positions in fp32; in float64,
concatenated with their differences, verification needed several times that)."""


def compare(pairs: Iterable[tuple[Any, Any]], *, rtol: float = 1e-4, quantile: float = 1.0,
            skip_mismatched_shapes: bool = False, what: str = "output") -> Agreement:
    """Compare (reference, got) pairs of tensors or arrays; see the module docstring.

    `pairs` is consumed once, pair by pair (a generator keeps one pair alive at a time): every
    number is a running maximum or sum, accumulated over float64 chunks of `CHUNK` values;
    only `quantile` < 1 keeps the absolute differences, as float32.

    Raises VerificationError on a shape mismatch (unless `skip_mismatched_shapes`) or on
    integer values that differ; tolerance failures are reported by `Agreement.check`.
    """
    diffs: list[torch.Tensor] = []  # only for quantile < 1
    total = skipped = values = 0
    max_abs = max_ref = 0.0
    diff_sq = ref_sq = got_sq = dot = 0.0
    for r, g in pairs:  # not enumerate(): it keeps its last item, the previous pair, alive
        i, total = total, total + 1
        r, g = _tensor(r), _tensor(g)
        if tuple(r.shape) != tuple(g.shape):
            if skip_mismatched_shapes:
                skipped += 1
                continue
            raise VerificationError(f"{what} {i}: shape {tuple(g.shape)} != reference shape {tuple(r.shape)}")
        if not r.is_floating_point():
            if not torch.equal(r, g.to(r.dtype)):
                raise VerificationError(f"{what} {i}: integer values differ from the reference")
            continue
        if not r.numel():
            continue
        r, g = r.reshape(-1), g.reshape(-1)
        for lo in range(0, r.numel(), CHUNK):
            a, b = r[lo:lo + CHUNK].double(), g[lo:lo + CHUNK].double()
            d = (a - b).abs()
            max_abs = max(max_abs, float(d.max()))
            max_ref = max(max_ref, float(a.abs().max()))
            diff_sq += float(d.square().sum())
            ref_sq += float(a.square().sum())
            got_sq += float(b.square().sum())
            dot += float(a.dot(b))
            if quantile < 1.0:
                diffs.append(d.float())
        values += r.numel()
        del r, g, a, b, d  # before the next pair is computed (a generator of pairs then holds one)
    compared = f"all {what}s" if not skipped else f"{total - skipped} of {total} {what}s (others changed shape)"
    if not values:
        return Agreement(0.0, 0.0, 0.0, 1.0, 0.0, rtol, quantile, 0, compared)
    scale = max(max_ref, 1e-6)
    checked = max_abs
    if quantile < 1.0:
        diff = torch.cat(diffs)
        del diffs
        sample = diff if diff.numel() <= 1 << 24 else diff[torch.randperm(diff.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 24]]
        checked = float(torch.quantile(sample, quantile))
    l2 = diff_sq ** 0.5
    norm = max(ref_sq ** 0.5, got_sq ** 0.5)
    identical = l2 <= 1e-7 * max(norm, 1e-30) or norm < 1e-20
    # torch.nn.functional.cosine_similarity over the concatenation: dot / max(|x| |y|, eps)
    cosine = 1.0 if identical else dot / max((ref_sq * got_sq) ** 0.5, 1e-8)
    rel_l2 = 0.0 if norm < 1e-20 else l2 / max(norm, 1e-12)
    return Agreement(max_abs, max_abs / scale, checked / scale, cosine, rel_l2, rtol, quantile, values, compared)
