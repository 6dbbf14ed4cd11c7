"""Weight quantizers (RTN, AWQ, GPTQ), SmoothQuant migration, and the calibration statistics they use.

Pure functions on tensors: a weight `W: f32[N, K]` (output rows, input columns, as
`aten.linear` stores it) goes in; integer levels, per-group scales and zero points come
out (the layout of `kernels.quant.linear_q`). The statistics come from one streaming run
over the calibration batches (`collect_input_stats`, on the float model), or, for GPTQ, from
`sequential_input_stats`, which measures each layer's inputs on the already-quantized prefix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from rewrite.kernels.quant import (dequantize, group_params, pack, quantize_groups, quantize_with, search_group_params,
                                   unpack)
from rewrite.calibration import observe
from rewrite.inputs import Inputs
from rewrite.program import Program
from rewrite.statistics import extend_sample, token_rows

TOKEN_WEIGHTS = ("uniform", "normalized", "clipped")
DEFAULT_CLIP_NORMS = 4.0  # the default of the gptq spec's `clip_norms` (a token counts at most like one at 4x the median norm)


def token_weights(x: torch.Tensor, mode: str, clip_norms: float = DEFAULT_CLIP_NORMS) -> torch.Tensor | None:
    """Per-row weights of GPTQ's X^T X (None: uniform, the plain X^T X).

    Why: in decoder LLMs the token norms at a linear's input spread over orders of magnitude
    (attention-sink and delimiter tokens reach 10-200x the median at the down projections). The
    plain objective sum_t |x_t dW^T|^2 is then spent on the few largest tokens, and on SmolLM2
    GPTQ lost to RTN end to end although its per-layer error was lower (the error measure was
    dominated by the same tokens). "normalized" weights each token by (median / |x_t|)^2, so
    GPTQ minimises every token's RELATIVE output error alike; "clipped" only caps tokens above
    `clip_norms` x the median norm (a robust, Huber-like X^T X).
    """
    if mode == "uniform" or x.shape[0] == 0:
        return None
    norms = x.norm(dim=1).clamp_min(1e-12)
    med = norms.median()
    if mode == "normalized":
        return (med / norms) ** 2
    if mode == "clipped":
        return (clip_norms * med / norms).clamp(max=1.0) ** 2
    raise ValueError(f"token weighting must be one of {TOKEN_WEIGHTS}, got {mode!r}")


@dataclass
class InputStats:
    """Streaming statistics of one linear input x[..., K] (rows = tokens)."""

    k: int
    token_weight: str = "uniform"              # see `token_weights`: how each token counts in X^T X
    clip_norms: float = DEFAULT_CLIP_NORMS     # the cap of token_weight "clipped", in median norms
    rows: int = 0
    abs_sum: torch.Tensor | None = None       # sum |x| per channel (AWQ saliency)
    abs_max: torch.Tensor | None = None       # max |x| per channel (SmoothQuant)
    gram: torch.Tensor | None = None          # X^T X (GPTQ Hessian / output error)
    cross: torch.Tensor | None = None         # X_float^T X (float-target GPTQ: see `drift_corrected`)
    lo: float = float("inf")                  # per-tensor range (static int8 activations)
    hi: float = float("-inf")
    sample: list[torch.Tensor] = field(default_factory=list)

    def update(self, x: torch.Tensor, want_gram: bool) -> None:
        x = x.detach().reshape(-1, self.k).to(torch.float32)
        a = x.abs()
        self.abs_sum = a.sum(0) if self.abs_sum is None else self.abs_sum + a.sum(0)
        self.abs_max = a.amax(0) if self.abs_max is None else torch.maximum(self.abs_max, a.amax(0))
        if want_gram:
            xd = x.double()
            wts = token_weights(xd, self.token_weight, self.clip_norms)
            xt = (xd * wts[:, None]).T if wts is not None else xd.T
            # accumulated in place: `gram + xt @ xd` held two more K x K float64 matrices at once
            # (3 GB at K = 11008, the down_proj of a 7B Llama)
            if self.gram is None:
                self.gram = xt @ xd
            else:
                self.gram.addmm_(xt, xd)
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        extend_sample(self.sample, x)  # AWQ's search sample: the statistics service's sampler
        self.rows += x.shape[0]

    def update_cross(self, x_float: torch.Tensor, x: torch.Tensor) -> None:
        """Accumulate X_float^T X over the same rows (each weighted like X^T X), `x_float` being what
        the float model feeds this input where the quantized prefix feeds `x`."""
        xf = x_float.detach().reshape(-1, self.k).double()
        xq = x.detach().reshape(-1, self.k).double()
        wts = token_weights(xq, self.token_weight, self.clip_norms)
        c = (xf * wts[:, None]).T @ xq if wts is not None else xf.T @ xq
        self.cross = c if self.cross is None else self.cross + c

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)

    @property
    def hessian(self) -> torch.Tensor:
        return (self.gram / max(self.rows, 1)).to(torch.float32)

    def take_hessian(self) -> torch.Tensor:
        """`hessian` (the same values), consuming the float64 sum: it is divided in place and then
        dropped, so one K x K float64 matrix and the float32 result are alive, not two float64 ones."""
        self.gram.div_(max(self.rows, 1))
        h, self.gram = self.gram.to(torch.float32), None
        return h

    def compact(self) -> None:
        """Drop what only a fit needs once the fit is done: X^T X kept as float32 (the reports' output
        error reads it), the float-target cross term and the activation sample freed. Sequential GPTQ
        holds one InputStats per input of the whole model; float64 grams and cross terms of every
        input until the pass ended took SmolLM2's float-target run past 13 GB."""
        if self.gram is not None:
            self.gram = self.gram.to(torch.float32)
        self.cross = None
        self.sample = []

    def x_sample(self) -> torch.Tensor:
        return torch.cat(self.sample, 0)


class _Collector:
    def __init__(self, inputs: dict[fx.Node, int], want_gram: bool):
        self.inputs = inputs
        self.want_gram = want_gram
        self.stats: dict[fx.Node, InputStats] = {n: InputStats(k) for n, k in inputs.items()}

    def nodes(self, program: Program) -> list[fx.Node]:
        return list(self.inputs)

    def update(self, node: fx.Node, value: Any, batch: Inputs) -> None:
        if isinstance(value, torch.Tensor):
            self.stats[node].update(value, self.want_gram)


def collect_input_stats(program: Program, batches: list[Inputs], inputs: dict[fx.Node, int], *,
                        want_gram: bool) -> dict[fx.Node, InputStats]:
    """One calibration run: statistics of each node in `inputs` (node -> its last-dim size K)."""
    col = _Collector(inputs, want_gram)
    observe(program, batches, [col], desc="quantize: calibrating")
    return col.stats


def sequential_input_stats(program: Program, batches: list[Inputs], targets: dict[fx.Node, tuple[fx.Node, fx.Node, int]],
                           requantize: Callable[[fx.Node, InputStats], torch.Tensor],
                           token_weight: str = "uniform", clip_norms: float = DEFAULT_CLIP_NORMS,
                           float_inputs: bool = False,
                           holdout: list[Inputs] | None = None) -> dict[fx.Node, InputStats]:
    """Statistics of each target's input measured on the ALREADY-QUANTIZED prefix of the graph.

    GPTQ corrects a layer's rounding error for the inputs it will really see. Measured on the
    float model (one shot), every layer's Hessian describes inputs that no longer occur once the
    earlier layers are quantized, and the layer cannot absorb the drift they cause; the GPTQ
    paper quantizes sequentially for that reason. Here the graph runs node by node over ALL
    calibration batches at once (one forward's work in total): when a target linear is reached,
    its input statistics are complete, `requantize(node, stats)` quantizes it and returns the
    weight it stores (dequantized, in the stored layout), and that weight is used from then on.
    Only the ancestors of the targets run (not the lm_head's logits); padded tokens are dropped
    (`statistics.token_rows`, the one padding policy).
    `float_inputs`: the float graph runs alongside, and each input's statistics also hold
    X_float^T X (`InputStats.cross`), which `drift_corrected` turns into the weight that maps the
    quantized prefix's inputs back onto the float model's outputs.
    `holdout`: batches that run alongside (on the same quantized prefix) but are not fitted on:
    their statistics go to `requantize(node, stats, held_back_stats)` as a third argument, so each
    fit can be checked against its unfitted alternative on tokens it never saw.

    `targets`: linear node -> (input node, weight get_attr node, K).
    """
    order = list(program.graph.nodes)
    needed: set[fx.Node] = {n for n in order if n.op == "placeholder"}
    stack = list(targets)
    while stack:
        n = stack.pop()
        if n not in needed or n.op == "placeholder":
            needed.add(n)
            stack.extend(a for a in n.all_input_nodes if a not in needed)
    last_use: dict[fx.Node, fx.Node] = {}
    for n in order:
        if n in needed:
            for a in n.all_input_nodes:
                last_use[a] = n
    def interpreters() -> list[fx.Interpreter]:
        out = []
        for b in batches:
            it = fx.Interpreter(program.module, garbage_collect_values=False)
            it.args_iter = iter(program.flat_inputs(b))
            it.env = {}
            out.append(it)
        return out

    n_fit = len(batches)
    batches = list(batches) + list(holdout or [])
    interps = interpreters()
    floats = interpreters() if float_inputs else []
    stats: dict[fx.Node, InputStats] = {}
    held: dict[fx.Node, InputStats] = {}
    unfitted: dict[fx.Node, int] = {}   # input -> its target linears not quantized yet
    for x, _, _ in targets.values():
        unfitted[x] = unfitted.get(x, 0) + 1
    with torch.no_grad():
        for n in order:
            if n not in needed:
                continue
            if n in targets:
                x, w_node, k = targets[n]
                if x not in stats:
                    st, hs = (InputStats(k, token_weight=token_weight, clip_norms=clip_norms) for _ in range(2))
                    for i, (it, b) in enumerate(zip(interps, batches)):
                        (st if i < n_fit else hs).update(token_rows(program, x, it.env[x], b), want_gram=True)
                    for i, (it, fl, b) in enumerate(zip(interps, floats, batches)):
                        (st if i < n_fit else hs).update_cross(token_rows(program, x, fl.env[x], b),
                                                               token_rows(program, x, it.env[x], b))
                    stats[x], held[x] = st, hs
                w_new = requantize(n, stats[x], held[x]) if holdout else requantize(n, stats[x])
                for it in interps:
                    it.env[w_node] = w_new
                unfitted[x] -= 1
                if unfitted[x] == 0:  # every reader of x is quantized: keep only what the caller reports with
                    stats[x].compact()
                    del held[x]
            for it in interps + floats:
                it.env[n] = it.run_node(n)
            for a in n.all_input_nodes:
                if last_use.get(a) is n:
                    for it in interps + floats:
                        it.env.pop(a, None)
    return stats


def drift_corrected(w: torch.Tensor, stats: InputStats, damp: float = 0.01) -> torch.Tensor:
    """The weight W' that best maps the inputs X the quantized prefix produces onto the float layer's
    outputs W X_float: W' = W + W (C - H) (H + d I)^-1 (C = X_float^T X, H = X^T X), the least-squares
    solution with the CHANGE W' - W damped (ridge), so inputs without drift (C = H) give W exactly.

    Why: sequential GPTQ fits each layer to reproduce W X on its drifted inputs X, so every layer
    inherits the error of all layers before it. The float model's output is the real target:
    ||W X_f - Q X||^2 = ||W X_f - W' X||^2 + ||(W' - Q) X||^2 (W' is the least-squares solution, its
    residual is orthogonal to X), so GPTQ of W' with the same H minimises the error to the float
    model (GPTAQ's "asymmetric calibration"). Without the float statistics (stats.cross None): W.
    """
    if stats.cross is None or stats.gram is None:
        return w
    h = stats.gram.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(torch.diag(h).mean()))
    wd = w.double()
    rhs = wd @ (stats.cross - stats.gram)                # W (X_f - X)^T X  [N, K]
    delta = torch.linalg.solve(h, rhs.T).T                # H symmetric: (H^-1 rhs^T)^T = rhs H^-1
    delta[:, dead] = 0.0
    return (wd + delta).to(w.dtype)


def target_error(w: torch.Tensor, w_hat: torch.Tensor, stats: InputStats) -> float:
    """||W X_target - W_hat X||^2 up to a term that does not depend on W_hat: tr(W_hat H W_hat^T) -
    2 tr(W C W_hat^T), C = X_float^T X when the statistics carry it (float target), else H (own output).
    Lower is better; compares candidate quantizations of one weight on one set of tokens."""
    if stats.gram is None:
        return float((w_hat - w).norm())
    h = stats.gram
    c = stats.cross if stats.cross is not None else h
    wh, wd = w_hat.double(), w.double()
    return float(((wh @ h) * wh).sum() - 2.0 * ((wd @ c) * wh).sum())


# ----------------------------------------------------------------------------- results
@dataclass
class Quantized:
    """One quantized weight in the kernel's layout, plus what the report shows."""

    qweight: torch.Tensor   # u8[N, ceil(K*bits/8)]
    scales: torch.Tensor    # f32[N, K//g]
    zeros: torch.Tensor     # u8[N, K//g]
    bits: int
    group_size: int
    k: int

    def weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.k)


def _pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, g: int) -> Quantized:
    return Quantized(pack(q.to(torch.uint8), bits), scales.to(torch.float32).contiguous(),
                     zeros.to(torch.uint8).contiguous(), bits, g, q.shape[1])


def rtn(w: torch.Tensor, bits: int, g: int, symmetric: bool, clip_search: bool = False, fp16_scales: bool = False,
        importance: torch.Tensor | None = None) -> Quantized:
    """Round to nearest per group (min/max range; `clip_search` shrinks ranges by weight MSE, each
    column weighted by `importance` f32[K] when given, e.g. the Hessian diagonal)."""
    q, s, z = quantize_groups(w, bits, g, symmetric, clip_search=clip_search, fp16_scales=fp16_scales,
                              importance=importance)
    return _pack(q, s, z, bits, g)


# ----------------------------------------------------------------------------- AWQ
def awq_scales(weights: list[torch.Tensor], stats: InputStats, bits: int, g: int, symmetric: bool,
               grid: int = 11) -> tuple[torch.Tensor, float, float]:
    """AWQ: per-input-channel scales s = mean|x|^alpha (normalised), alpha searched on calibration data.

    The linears in `weights` share one input (q/k/v): one s for all of them, chosen to
    minimise the summed output error ||x W^T - (x/s) Q(W s)^T||^2 on sampled rows.
    Returns (s, best alpha, error ratio best/alpha=0).
    """
    x = stats.x_sample()
    ref = [x @ w.T for w in weights]
    saliency = stats.mean_abs.clamp_min(1e-8)
    best = (torch.ones_like(saliency), 0.0, float("inf"))
    base = None
    for i in range(grid):
        alpha = i / (grid - 1)
        s = saliency.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, r in zip(weights, ref):
            wq = rtn(w * s, bits, g, symmetric).weight() / s
            err += float(((x @ wq.T - r) ** 2).sum())
        if base is None:
            base = err
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2] / max(base or 1.0, 1e-30)


# ----------------------------------------------------------------------------- GPTQ
@dataclass(frozen=True)
class GPTQFactor:
    """What GPTQ needs from a Hessian: the upper Cholesky factor of the damped inverse and the dead
    (never active) input channels. It depends on the input only, so the linears that read the same
    input (q/k/v, gate/up) and the row chunks of a large weight share one (`gptq_factor`)."""
    hinv: torch.Tensor
    dead: torch.Tensor
    diag: torch.Tensor | None = None   # diag(H): column importance of `clip_search`


def gptq_factor(hessian: torch.Tensor, damp: float = 0.01) -> GPTQFactor:
    """The GPTQ factor of `hessian` (float32 or float64; not modified), in float64.

    >>> f = gptq_factor(torch.eye(4) * 2.0)
    >>> f.hinv.shape, bool(f.dead.any())
    (torch.Size([4, 4]), False)
    """
    dead = torch.diag(hessian) == 0

    def fresh() -> torch.Tensor:
        h = hessian.detach().to(torch.float64, copy=True)   # a float64 H is not the caller's to change
        h[dead, dead] = 1.0
        return h

    diag = torch.diag(hessian).detach().to(torch.float64, copy=True)
    diag[dead] = 1.0
    return GPTQFactor(_inverse_hessian_factor(fresh, damp), dead, diag)


def _factor_in_place(h: torch.Tensor, info: torch.Tensor) -> bool:
    """h (a damped Hessian, row-major float64) becomes the upper Cholesky factor of its inverse, in
    its own storage; False if a factorization failed (h is then garbage).

    With SciPy, LAPACK works on h's memory itself (potrf, potri, potrf on the column-major view
    of the symmetric matrix: the lower factor of the inverse, read row-major, is the upper
    factor): one K x K float64 matrix in all. torch's `out=` variants copy once per step (two
    matrices at the peak), which is the fallback without SciPy.
    """
    try:
        from scipy.linalg import lapack
    except ImportError:
        lapack = None
    if lapack is not None and h.is_contiguous():
        a = h.numpy().T                                  # Fortran order, the same bytes (H is symmetric)
        for step in (lambda: lapack.dpotrf(a, lower=1, clean=1, overwrite_a=1),
                     lambda: lapack.dpotri(a, lower=1, overwrite_c=1),
                     lambda: lapack.dpotrf(a, lower=1, clean=1, overwrite_a=1)):
            out, code = step()
            if code != 0:
                return False
            if not np.shares_memory(out, a):             # not done in place (never expected): copy back
                a[...] = out
        if not np.isfinite(a.diagonal()).all():
            return False
        return True
    torch.linalg.cholesky_ex(h, out=(h, info))
    if int(info):
        return False
    torch.cholesky_inverse(h, out=h)
    torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
    return int(info) == 0


def _inverse_hessian_factor(fresh: Callable[[], torch.Tensor], damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, damping more until it is positive definite.

    `fresh()` returns the caller's H as a new float64 matrix (dead channels already set), which
    is factored in place (`_factor_in_place`): at K = 8192 that is 0.5 GB in all, where building
    each intermediate as a new matrix beside H took 2.5 GB. A failed try asks for H again. The
    values are those of cholesky(cholesky_inverse(cholesky(H + dI)), upper=True)."""
    h = fresh()
    diag = torch.diag(h).clone()
    mean_diag = float(diag.mean())
    info = torch.zeros((), dtype=torch.int32)
    for d in (damp, 0.1, 1.0):
        if h is None:
            h = fresh()
        h.diagonal().copy_(diag + d * mean_diag)
        if _factor_in_place(h, info):
            return h
        h = None
    raise RuntimeError("GPTQ: the Hessian is not positive definite even with damping 1.0")


def gptq(w: torch.Tensor, hessian: torch.Tensor | None, bits: int, g: int, symmetric: bool,
         damp: float = 0.01, block: int = 128, act_order: bool = False, clip_search: bool = False,
         factor: GPTQFactor | None = None, grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> Quantized:
    """GPTQ: quantize column by column, spreading each column's error over the not yet quantized
    columns through the inverse Hessian's Cholesky factor (lazy batch updates of `block` columns).

    Group scales: without `act_order`, from the already-updated weights when a group starts
    (the reference algorithm). With `act_order`, columns are processed in order of decreasing
    Hessian diagonal (the most sensitive first, while there are many columns left to absorb
    their error), but the groups stay the contiguous groups of the ORIGINAL column order (the
    kernel's layout), so their scales are fixed up front from the float weights ("static
    groups"). `clip_search` (both modes) chooses each group's range, when the group is reached
    (or up front with `act_order`), by the smallest error weighted by the Hessian diagonal
    (`kernels.quant.search_group_params`): min/max ranges waste levels on one outlier weight.
    The Hessian is computed in float64 by the caller; the elimination runs in float64 too,
    because at K >= 1536 float32 Cholesky of a nearly singular H loses the small columns.
    `factor`: a precomputed `gptq_factor(hessian, damp)` shared by the weights that read the same
    input (then `hessian` may be None; not with `act_order`, whose factor is of the permuted H).
    `grid`: fixed (scales, zeros) [N, K // g] to round on (e.g. `refit_scales`' of an earlier pass),
    instead of ranges taken when a group is reached.
    """
    w = w.detach().to(torch.float64).clone()
    n, k = w.shape
    if factor is not None and act_order:
        raise ValueError("gptq: a shared factor is of the unpermuted Hessian; act_order needs the Hessian itself")
    if factor is None:
        assert hessian is not None, "gptq needs the Hessian or its factor"
        dead = torch.diag(hessian) == 0
    else:
        dead = factor.dead
    hdiag = None  # diag(H) (dead channels 1): the column importance of `clip_search`
    if clip_search:
        if factor is not None:
            hdiag = None if factor.diag is None else factor.diag.clone().to(torch.float64)
        else:
            hdiag = torch.diag(hessian).detach().to(torch.float64, copy=True)
            hdiag[dead] = 1.0
    w[:, dead] = 0.0
    scales = torch.zeros(n, k // g, dtype=torch.float64)
    zeros = torch.zeros(n, k // g, dtype=torch.float64)
    perm = torch.arange(k)
    if grid is not None:
        scales, zeros = grid[0].to(torch.float64).clone(), grid[1].to(torch.float64).clone()
    if act_order:
        from rewrite.kernels.quant import quantize_groups
        if grid is None:
            _, s0, z0 = quantize_groups(w.float(), bits, g, symmetric, clip_search=clip_search,
                                        importance=None if hdiag is None else hdiag.float())
            scales, zeros = s0.double(), z0.double()
        hd = torch.diag(hessian).to(torch.float64)
        hd[dead] = 1.0
        perm = torch.argsort(hd, descending=True)
        w = w[:, perm]

    def fresh() -> torch.Tensor:
        h = hessian.detach().to(torch.float64).clone()
        h[dead, dead] = 1.0
        return h[perm][:, perm] if act_order else h

    hinv = factor.hinv if factor is not None else _inverse_hessian_factor(fresh, damp)
    block = max(g, (block // g) * g) if g <= block else g
    q_all = torch.zeros(n, k, dtype=torch.float64)
    scale = zero = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col])
            if act_order or grid is not None:
                scale, zero = scales[:, orig // g], zeros[:, orig // g]
            elif col % g == 0:
                grp = w1[:, i:i + g] if i + g <= i2 - i1 else torch.cat([w1[:, i:], w[:, i2:col + g]], 1)
                if clip_search:
                    imp = hdiag[col:col + g] if hdiag is not None else None
                    scale, zero = search_group_params(grp, bits, symmetric, imp)
                else:
                    scale, zero = group_params(grp, bits, symmetric)
                scales[:, col // g], zeros[:, col // g] = scale, zero
            wc = w1[:, i]
            q = quantize_with(wc.unsqueeze(-1), scale, zero, bits).squeeze(-1)
            wq = (q - zero) * scale
            q_all[:, orig] = q
            e = (wc - wq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return _pack(q_all, scales, zeros, bits, g)


def refit_scales(target: torch.Tensor, qz: Quantized, hessian: torch.Tensor, ridge: float = 1e-6) -> Quantized:
    """The same integer codes and zero points with each row's group scales refitted by least squares:
    s_r = argmin (t_r - A_r s)^T H (t_r - A_r s), A_r[c, j] = q_rc - z_rj for column c in group j.

    Why: GPTQ fixes a group's scale from the weights' min/max when the sweep reaches it, before the
    codes are chosen, so the scale is only right for the range, not for the codes GPTQ then picks
    (nor for the error it pushed into later columns). With the codes fixed the output error is a
    quadratic in the scales of a row (its G groups are coupled through H), and its minimum is one
    G x G solve per row. It can only lower the calibration objective (the old scales are feasible);
    a row whose system is singular (a group whose codes all equal its zero point) or whose solve
    gives a non-positive scale keeps its old scales.
    `target`: what the weight should reproduce ([N, K]: the float weight, or `drift_corrected`'s).
    """
    n, k, g = qz.scales.shape[0], qz.k, qz.group_size
    groups = k // g
    a = (unpack(qz.qweight, qz.bits, k).to(torch.float64).reshape(n, groups, g)
         - qz.zeros.to(torch.float64).unsqueeze(-1))                                   # [N, G, g]
    h = hessian.to(torch.float64).reshape(groups, g, groups, g)
    t = target.to(torch.float64).reshape(n, groups, g)
    scales = qz.scales.to(torch.float64).clone()
    step = max(1, (1 << 24) // max(k * groups, 1))                                      # rows per chunk
    for r0 in range(0, n, step):
        ar = a[r0:r0 + step]
        hat = torch.einsum("jalb,rlb->rja", h, t[r0:r0 + step])                        # H t_r, [r, G, g]
        # M_r[j, l] = a_rj^T H_jl a_rl; b_r[j] = a_rj^T (H t_r)_j
        m = torch.einsum("rja,jalb,rlb->rjl", ar, h, ar)
        b = (ar * hat).sum(-1)
        diag = m.diagonal(dim1=1, dim2=2)
        m = m + torch.diag_embed(ridge * diag.mean(-1, keepdim=True).clamp_min(1e-30).expand_as(diag))
        sol, info = torch.linalg.solve_ex(m, b.unsqueeze(-1))
        sol = sol.squeeze(-1)
        ok = (info == 0) & (sol > 0).all(-1) & torch.isfinite(sol).all(-1) & (diag > 0).all(-1)
        scales[r0:r0 + step][ok] = sol[ok]
    return Quantized(qz.qweight, scales.to(torch.float32).contiguous(), qz.zeros, qz.bits, g, k)


def gptq_refined(w: torch.Tensor, hessian: torch.Tensor, bits: int, g: int, symmetric: bool, refit_rounds: int = 0,
                 **options: Any) -> Quantized:
    """`gptq`, then `refit_rounds` rounds of: refit the group scales to the codes (`refit_scales`), and
    (but after the last) run GPTQ again on that fixed grid, so the codes are chosen for the scales
    they will be stored with. 0: plain `gptq`. `options`: `gptq`'s keywords (damp, act_order, factor...).

    Why: GPTQ's scales come from each group's min/max before its codes are chosen; the refit and the
    re-run alternate between the two halves of the problem (scales given codes, codes given scales).
    The refit never raises the calibration objective; the re-run (greedy, like GPTQ) usually lowers
    it. On SmolLM2 layers (16 x 512 calibration tokens,
    8 x 512 held back) the held-back output error fell 3-12% over 4 rounds, more at 3 bits.

        >>> _ = torch.manual_seed(0)
        >>> w, x = torch.randn(8, 64), torch.randn(256, 64)
        >>> h = x.T @ x / 256
        >>> err = lambda q: float(((q.weight() - w) @ h * (q.weight() - w)).sum())
        >>> err(gptq_refined(w, h, 3, 32, False, refit_rounds=1)) < err(gptq(w, h, 3, 32, False))
        True
    """
    qz = gptq(w, hessian, bits, g, symmetric, **options)
    for i in range(refit_rounds):
        qz = refit_scales(w, qz, hessian)
        if i < refit_rounds - 1:
            qz = gptq(w, hessian, bits, g, symmetric, grid=(qz.scales, qz.zeros), **options)
    return qz


# ----------------------------------------------------------------------------- SmoothQuant
def smooth_scales(weights: list[torch.Tensor], stats: InputStats, alpha: float) -> torch.Tensor:
    """SmoothQuant: s_j = max|x_j|^alpha / max|W_j|^(1-alpha); x/s and W*s (outliers move into W)."""
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp_min(1e-5)
    s = stats.abs_max.clamp_min(1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp_min(1e-5)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, stats: InputStats | None,
                 hessian: torch.Tensor | None = None) -> float:
    """Relative output error tr(dW H dW^T) / tr(W H W^T) on calibration inputs (weight error without).
    `hessian`: `stats.hessian` when the caller already holds it (and dropped `stats.gram`)."""
    if hessian is None and (stats is None or stats.gram is None):
        d = (w_hat - w).to(torch.float32)
        return float(d.norm() / w.norm().clamp_min(1e-12))
    h = hessian if hessian is not None else stats.hessian
    # in row chunks: whole-weight temporaries (dW, dW @ H, W @ H) were 3 more copies of the weight
    num = den = 0.0
    step = max(1, (1 << 22) // max(w.shape[-1], 1))
    for a in range(0, w.shape[0], step):
        wa = w[a:a + step].to(torch.float32)
        d = w_hat[a:a + step].to(torch.float32) - wa
        num += float(((d @ h) * d).sum())
        den += float(((wa @ h) * wa).sum())
    return (max(num, 0.0) / max(den, 1e-30)) ** 0.5
