"""The architecture zoo: small real models with random weights, for tests and benchmarks.

HF transformers classes built from small configs (BERT, GPT-2, LLaMA with grouped-query
attention, ViT, ResNet, ConvNeXt, MobileNetV2) and hand-written modules (a CNN with
residual adds and a concatenation, an MLP, a model returning a dict): `ALL`, the core set
most tests loop over. `WIDE` adds ~45 more HF architectures (`rewrite.zoo_hf`) for the
every-(model x pass) grid; `EVERY` is both. Each entry gives the model, example inputs
(with padding for text models) and a few calibration batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import zoo_hf
from .inputs import Inputs


@dataclass
class ZooModel:
    name: str
    model: nn.Module
    example: Inputs
    calibration: list[Inputs] = field(default_factory=list)
    kind: str = "text"  # text | vision | audio | other

    def batch(self, seed: int) -> Inputs:
        return _REGISTRY[self.name][1](seed)


def _text(vocab: int, seed: int = 0) -> Inputs:
    """The core zoo's token batches (ids from 1, the last row right-padded): `zoo_hf.text`."""
    return zoo_hf.text(seed, vocab=vocab, low=1)


def _image(size: int = 32, batch: int = 2, seed: int = 0, channels: int = 3) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    return Inputs((torch.randn(batch, channels, size, size, generator=g),), {})


# ----------------------------------------------------------------------- hand-written
class ResCatCNN(nn.Module):
    """A CNN with a residual add, a channel concatenation, a depthwise conv and batch norm."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.branch_a = nn.Conv2d(16, 8, 1)
        self.branch_b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 12, 1))
        self.head = nn.Conv2d(20, 24, 3, padding=1)
        self.fc = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.res(x))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = torch.relu(self.head(x))
        return self.fc(x.mean(dim=(2, 3)))


class MLP(nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 64, d_out: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DictOutput(nn.Module):
    """Returns a dict with a tensor and a nested tuple: output structure must survive."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> dict[str, Any]:
        h = self.norm(self.proj(x))
        return {"hidden": h, "stats": (h.mean(dim=-1), h * scale)}


# ----------------------------------------------------------------------- HF builders
def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=64, use_cache=False))


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False))


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                              intermediate_size=128), add_pooling_layer=False)


def _resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetModel

    return ResNetModel(ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2], layer_type="bottleneck"))


def _convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextModel

    return ConvNextModel(ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[2, 2], image_size=32))


def _mobilenet() -> nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2Model

    return MobileNetV2Model(MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_channels=3))


def _seeded(builder: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return _lived_in(builder().eval())

    return build


def _lived_in(model: nn.Module) -> nn.Module:
    """Give norm layers trained-looking statistics and affine weights.

    Fresh inits (zero-init last BN, unit running stats) make some random models output ~0,
    which hides numeric errors; and a LayerNorm / RMSNorm with unit weight and zero bias
    gives every token the same norm (sqrt(width)), so anything that ranks tokens by norm
    sees exact ties that float noise breaks differently in torch and onnxruntime.
    """
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            is_norm = isinstance(m, nn.modules.batchnorm._BatchNorm) or "Norm" in type(m).__name__
            weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
            if is_norm and isinstance(weight, torch.Tensor) and weight.dim() == 1:
                weight.copy_(torch.rand(weight.shape, generator=g) + 0.5)
                if isinstance(bias, torch.Tensor):
                    bias.copy_(torch.rand(bias.shape, generator=g) * 0.2 - 0.1)
    return model


_REGISTRY: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Inputs], str]] = {
    "bert": (_seeded(_bert), lambda s: _text(128, seed=s), "text"),
    "gpt2": (_seeded(_gpt2), lambda s: _text(128, seed=s), "text"),
    "llama": (_seeded(_llama), lambda s: _text(128, seed=s), "text"),
    "vit": (_seeded(_vit), lambda s: _image(32, seed=s), "vision"),
    "resnet": (_seeded(_resnet), lambda s: _image(32, seed=s), "vision"),
    "convnext": (_seeded(_convnext), lambda s: _image(32, seed=s), "vision"),
    "mobilenetv2": (_seeded(_mobilenet), lambda s: _image(32, seed=s), "vision"),
    "rescat_cnn": (_seeded(ResCatCNN), lambda s: _image(16, seed=s), "vision"),
    "mlp": (_seeded(MLP), lambda s: Inputs((torch.randn(4, 32, generator=torch.Generator().manual_seed(s)),), {}), "other"),
    "dict_output": (_seeded(DictOutput), lambda s: Inputs((torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(s)),
                                                           torch.tensor(2.0)), {}), "other"),
}

HF_MODELS = ("bert", "gpt2", "llama", "vit", "resnet", "convnext", "mobilenetv2")
HAND_WRITTEN = ("rescat_cnn", "mlp", "dict_output")
ALL = HF_MODELS + HAND_WRITTEN
"""The core zoo: every test that loops over architectures runs these."""

for _name, (_build, _batch, _kind) in zoo_hf.entries().items():
    _REGISTRY[_name] = (_seeded(_build), _batch, _kind)
WIDE = tuple(zoo_hf.entries())
"""The wider HF zoo (`rewrite.zoo_hf`): run by the zoo grid (tests/test_zoo_grid.py)."""
EVERY = ALL + WIDE


def load(name: str, calibration_batches: int = 4) -> ZooModel:
    if name not in _REGISTRY:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(EVERY)}")
    build, batch, kind = _REGISTRY[name]
    return ZooModel(name, build(), batch(0), [batch(100 + i) for i in range(calibration_batches)], kind)
