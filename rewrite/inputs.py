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


def dim_names(is_float: bool, rank: int) -> dict[int, str]:
    """What each dimension of an input means, by the conventions the exported interface uses.

    Batch (dim 0) always; `sequence_length` (dim 1) for token-like inputs: integer tensors of
    rank >= 2 (ids, masks) and float tensors of rank 3 (B, S, H embeddings); `height`/`width`
    (dims 2, 3) for images (float, rank 4). Capture makes batch and sequence dynamic; image
    sizes stay static, so their names only appear where a model makes them dynamic itself.
    """
    if rank == 0:
        return {}
    names = {0: "batch_size"}
    if rank >= 2 and (not is_float or rank == 3):
        names[1] = "sequence_length"
    if is_float and rank == 4:
        names[2], names[3] = "height", "width"
    return names


@dataclass(frozen=True)
class Inputs:
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, batch: Any) -> "Inputs":
        """Normalise one batch: a tensor, a tuple/list of positional args, a dict of keyword args, or Inputs."""
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
        """`fn(*args, **kwargs)` with this batch."""
        return fn(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor in the batch, flattened in (args, kwargs) order."""
        return [x for x in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(x, torch.Tensor)]

    def batch_size(self) -> int:
        """The leading dim of the first tensor (1 when there is none)."""
        tensors = self.tensors()
        return int(tensors[0].shape[0]) if tensors and tensors[0].dim() > 0 else 1

    def map(self, fn) -> "Inputs":
        """A new batch with `fn` applied to every tensor (structure kept)."""
        args, kwargs = pytree.tree_map_only(torch.Tensor, fn, (self.args, self.kwargs))
        return Inputs(tuple(args), dict(kwargs))

    def structure_matches(self, other: "Inputs") -> bool:
        """Same number of positional args and the same keyword names as `other`."""
        return len(self.args) == len(other.args) and set(self.kwargs) == set(other.kwargs)

    def flat(self) -> list[Any]:
        """Every leaf (tensors and constants), flattened in (args, kwargs) order."""
        return pytree.tree_leaves((self.args, self.kwargs))

    def mismatch(self, example: "Inputs") -> str | None:
        """Why this batch cannot stand in for `example` (None if it can): structure, rank, dtype, fixed dims.

        Batch and sequence dims may differ (they are captured dynamic); every other dim, the
        rank, the dtype and the nesting must match, or the captured graph's guards fail deep
        inside a pass with an unexplained AssertionError.
        """
        if not self.structure_matches(example):
            return (f"it has {len(self.args)} positional inputs and keywords {sorted(self.kwargs)}; expected "
                    f"{len(example.args)} positional and keywords {sorted(example.kwargs)}")
        mine, _ = pytree.tree_flatten_with_path((self.args, self.kwargs))
        theirs, spec = pytree.tree_flatten_with_path((example.args, example.kwargs))
        if len(mine) != len(theirs) or pytree.tree_structure((self.args, self.kwargs)) != spec:
            return f"it is nested differently from example_inputs (expected {_structure(example)})"
        for (path, got), (_, want) in zip(mine, theirs):
            name = _path_name(path)
            if not isinstance(want, torch.Tensor):
                continue
            if not isinstance(got, torch.Tensor):
                return f"input {name!r} is a {type(got).__name__}, expected a tensor of shape {_expected(want)}"
            dynamic = {d for d, n in dim_names(want.is_floating_point(), want.dim()).items() if n in ("batch_size", "sequence_length")}
            fixed_ok = got.dim() == want.dim() and all(d in dynamic or got.shape[d] == want.shape[d] for d in range(want.dim()))
            if not fixed_ok or got.dtype != want.dtype:
                return (f"input {name!r} has shape {_shape(got)} {_dtype(got)}, expected {_expected(want)} {_dtype(want)}"
                        + (f" (convert with .to({_dtype(want)}))" if fixed_ok else ""))
        return None

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs: `argI` for positional args, the key for keyword args."""
        for i, a in enumerate(self.args):
            if isinstance(a, torch.Tensor):
                yield f"arg{i}", a
        for k, v in self.kwargs.items():
            if isinstance(v, torch.Tensor):
                yield k, v


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _dtype(x: torch.Tensor) -> str:
    return str(x.dtype)


def _expected(x: torch.Tensor) -> str:
    """`[batch_size, sequence_length]` / `[batch_size, 3, 32, 32]`: the dims that may vary by name."""
    names = {d: n for d, n in dim_names(x.is_floating_point(), x.dim()).items() if n in ("batch_size", "sequence_length")}
    return "[" + ", ".join(names.get(d, str(s)) for d, s in enumerate(x.shape)) + "]"


def _path_name(path: tuple) -> str:
    """`input_ids`, `args[0]`, `pixel_values[1]`: a readable name for a leaf of (args, kwargs)."""
    if not path:
        return "input"
    top, rest = path[0], path[1:]
    parts: list[str] = []
    if getattr(top, "idx", None) == 0 and rest:  # args
        parts.append(f"args[{rest[0].idx}]" if hasattr(rest[0], "idx") else "args")
        rest = rest[1:]
    elif rest:  # kwargs
        parts.append(str(getattr(rest[0], "key", rest[0])))
        rest = rest[1:]
    for k in rest:
        parts.append(f"[{getattr(k, 'idx', getattr(k, 'key', k))!r}]" if not hasattr(k, "name") else f".{k.name}")
    return "".join(parts)


def _structure(inputs: Inputs) -> str:
    return str(pytree.tree_map_only(torch.Tensor, _expected, (inputs.args, inputs.kwargs)))
