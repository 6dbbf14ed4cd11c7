"""Weight quantization of a HF decoder in plain torch (fake-quant), for the LLM quality benchmark.

The same quantizers as the compiler (`passes.quantize_methods`: RTN, GPTQ) applied to the
decoder's `nn.Linear`s in place, with the statistics gathered either
- one-shot: every linear's Hessian X^T X from one run of the float model (what the quantize
  pass does today), or
- sequentially: block by block, each block's inputs produced by the already-quantized prefix
  (the GPTQ paper's procedure), so a block's quantizer sees, and corrects for, the error the
  earlier blocks made.

Used to find out why GPTQ did not beat RTN and to select settings on held-back wiki-train
text; the compiler's rows of the benchmark go through `rewrite.compile`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from rewrite.passes import quantize_methods as qm
from rewrite.passes.quantize import effective_group


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    return base.layers


def catch_layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Block 0's hidden-state inputs per batch and every block's other keyword arguments per batch.

    Each block's forward is replaced by a recorder that returns its input unchanged, so this
    costs only the embedding (the masks and rotary tables do not depend on the hidden states).
    """
    layers = decoder_layers(model)
    h0: list[torch.Tensor] = []
    kws: list[list[dict]] = [[] for _ in layers]
    originals = [layer.forward for layer in layers]

    def recorder(i: int):
        def fwd(hidden_states, *args, **kwargs):
            if i == 0:
                h0.append(hidden_states.detach())
            kw = dict(kwargs)
            kw.pop("cache", None)
            kw.pop("past_key_values", None)
            kw["use_cache"] = False
            kws[i].append(kw)
            return hidden_states
        return fwd

    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        base = getattr(model, "model", model)
        with torch.inference_mode():
            for ids in batches:
                base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for layer, f in zip(layers, originals):
            layer.forward = f
    return h0, kws


class _Gram:
    def __init__(self, k: int, token_weight: str = "uniform"):
        self.gram = torch.zeros(k, k, dtype=torch.float64)
        self.rows = 0
        self.token_weight = token_weight

    def hook(self, module, args, output):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        wts = qm.token_weights(x, self.token_weight)
        self.gram += (x * wts[:, None]).T @ x if wts is not None else x.T @ x
        self.rows += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.gram / max(self.rows, 1)


def _quantize_linear(lin: nn.Linear, method: str, bits: int, g: int, symmetric: bool, hessian: torch.Tensor | None,
                     act_order: bool, clip: bool) -> None:
    w = lin.weight.detach().float()
    gg = effective_group(w.shape[1], g)
    if method == "gptq":
        qz = qm.gptq(w, hessian, bits, gg, symmetric, act_order=act_order, clip_search=clip)
    else:
        qz = qm.rtn(w, bits, gg, symmetric, clip_search=clip)
    with torch.no_grad():
        lin.weight.copy_(qz.weight().to(lin.weight.dtype))


def quantize_decoder(model: nn.Module, method: str, bits: int, g: int = 128, symmetric: bool = False,
                     calibration: list[torch.Tensor] | None = None, sequential: bool = True,
                     act_order: bool = False, clip: bool = False, token_weight: str = "uniform") -> nn.Module:
    """Quantize every linear inside the decoder blocks in place (lm_head and embeddings stay float)."""
    layers = decoder_layers(model)
    linears = [[m for m in layer.modules() if isinstance(m, nn.Linear)] for layer in layers]
    if method == "rtn":
        for ls in linears:
            for lin in ls:
                _quantize_linear(lin, "rtn", bits, g, symmetric, None, act_order, clip)
        return model
    if calibration is None:
        raise ValueError("GPTQ needs calibration batches")
    h, kws = catch_layer_inputs(model, calibration)
    grams_all: list[dict[nn.Linear, _Gram]] = []
    if not sequential:  # one run of the float model gives every Hessian
        grams_all = [{lin: _Gram(lin.in_features, token_weight) for lin in ls} for ls in linears]
        hooks = [lin.register_forward_hook(gr.hook) for d in grams_all for lin, gr in d.items()]
        with torch.inference_mode():
            x = list(h)
            for i, layer in enumerate(layers):
                x = [layer(xb, **kw) for xb, kw in zip(x, kws[i])]
        for hk in hooks:
            hk.remove()
    with torch.inference_mode():
        for i, layer in enumerate(layers):
            if sequential:
                grams = {lin: _Gram(lin.in_features, token_weight) for lin in linears[i]}
                hooks = [lin.register_forward_hook(gr.hook) for lin, gr in grams.items()]
                for xb, kw in zip(h, kws[i]):
                    layer(xb, **kw)
                for hk in hooks:
                    hk.remove()
            else:
                grams = grams_all[i]
            with torch.inference_mode(False):
                for lin, gr in grams.items():
                    _quantize_linear(lin, "gptq", bits, g, symmetric, gr.hessian, act_order, clip)
            if sequential:
                h = [layer(xb, **kw) for xb, kw in zip(h, kws[i])]
    return model


def clone_model(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def describe(cfg: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items())
