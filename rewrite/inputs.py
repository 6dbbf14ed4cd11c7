"""Model inputs: positional args or keyword args, normalised to one shape.

`Inputs` is what the whole pipeline passes around for one batch: calibration batches,
example inputs, held-back verification batches. A batch given by the user may be a
tuple/list (positional), a dict (keyword), a single tensor, or an object with `.data`
(a transformers BatchEncoding).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
import torch.utils._pytree as pytree

from .errors import CalibrationError


@dataclass(frozen=True)
class Inputs:
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, batch: Any) -> "Inputs":
        if isinstance(batch, Inputs):
            return batch
        if isinstance(batch, torch.Tensor):
            return cls((batch,), {})
        if hasattr(batch, "data") and isinstance(getattr(batch, "data"), Mapping):  # BatchEncoding
            batch = dict(batch.data)
        if isinstance(batch, Mapping):
            return cls((), dict(batch))
        if isinstance(batch, (tuple, list)):
            return cls(tuple(batch), {})
        raise CalibrationError(
            f"cannot use a {type(batch).__name__} as model inputs: give a tuple of positional "
            "arguments, a dict of keyword arguments, or a single tensor"
        )

    def call(self, fn) -> Any:
        return fn(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        return [x for x in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(x, torch.Tensor)]

    def batch_size(self) -> int:
        tensors = self.tensors()
        return int(tensors[0].shape[0]) if tensors and tensors[0].dim() > 0 else 1

    def map(self, fn) -> "Inputs":
        args, kwargs = pytree.tree_map_only(torch.Tensor, fn, (self.args, self.kwargs))
        return Inputs(tuple(args), dict(kwargs))

    def structure_matches(self, other: "Inputs") -> bool:
        return len(self.args) == len(other.args) and set(self.kwargs) == set(other.kwargs)

    def flat(self) -> list[Any]:
        return pytree.tree_leaves((self.args, self.kwargs))

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for i, a in enumerate(self.args):
            if isinstance(a, torch.Tensor):
                yield f"arg{i}", a
        for k, v in self.kwargs.items():
            if isinstance(v, torch.Tensor):
                yield k, v
