"""Hugging Face checkpoint folders without materialising the model: a meta-device model plus a lazy weight store.

`load_hf(DIR)` reads `config.json`, builds the model class the config names with every
PARAMETER on the meta device (no memory, no random init), and opens the folder's
`*.safetensors` files (one file, or shards listed by `model.safetensors.index.json`) as a
`WeightStore` that reads one tensor, or a slice of its rows, when asked, in the checkpoint's
dtype. Why parameters and not the whole model on meta: buffers that are not in the
checkpoint (rotary `inv_freq`, BERT `position_ids`) are computed in the modules' `__init__`
and would be lost on meta; they are small, so they stay real.

`Checkpoint.materialize(prefix, dtype)` loads the real weights of one submodule (a decoder
block) and `release(prefix)` puts them back on meta: that is what keeps the sequential
pipeline (`rewrite.sequential`) at about one block of memory. Tied parameters (an lm_head
tied to the embedding) are one `nn.Parameter` under several names; the store resolves any of
the names to the one tensor the checkpoint holds.

Not handled yet: checkpoints whose tensor names transformers converts on load (e.g. fused
MoE experts in transformers 5); such a name is reported as missing, naming the file.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import RewriteError

INDEX = "model.safetensors.index.json"


class CheckpointError(RewriteError, ValueError):
    """The checkpoint folder cannot be read: the message names the file or tensor and the fix."""


# ----------------------------------------------------------------------------- the weight store
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class WeightStore:
    """Tensors of a folder's safetensors files, read one at a time (never the whole file).

    `get(name)` returns the tensor in its stored dtype (or `dtype`), `rows(name, a, b)` a slice of
    its first dimension; file handles are opened once and kept (safetensors memory-maps them,
    so an open handle costs address space, not resident memory).
    """

    def __init__(self, directory: Path, files: dict[str, Path]):
        self.directory = directory
        self._file_of = files                   # tensor name -> file
        self._handles: dict[Path, Any] = {}
        self.aliases: dict[str, str] = {}       # model parameter name -> checkpoint tensor name

    def __contains__(self, name: str) -> bool:
        return self._resolve(name, strict=False) is not None

    def names(self) -> list[str]:
        return list(self._file_of)

    def _resolve(self, name: str, strict: bool = True) -> str | None:
        key = name if name in self._file_of else self.aliases.get(name)
        if key is None and strict:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint {self.directory} "
                                  f"({len(self._file_of)} tensors in {len(set(self._file_of.values()))} safetensors "
                                  "files): the config does not match the weights; check config.json")
        return key

    def _slice(self, name: str) -> Any:
        key = self._resolve(name)
        path = self._file_of[key]
        if path not in self._handles:
            from safetensors import safe_open

            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_slice(key)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._slice(name).get_dtype()
        if code not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {code}, which rewrite cannot read (use bf16, fp16 or fp32)")
        return _DTYPES[code]

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self._slice(name)[:]
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [start, stop) of the first dimension, read without the rest of the tensor."""
        t = self._slice(name)[start:stop]
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def nbytes(self, name: str) -> int:
        shape = self.shape(name)
        n = 1
        for s in shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype(name)).element_size()

    def close(self) -> None:
        self._handles.clear()


def _safetensors_files(directory: Path) -> dict[str, Path]:
    """tensor name -> file, from the index when there is one, else from every *.safetensors header."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {exc}; "
                                  "re-save the checkpoint with save_pretrained") from None
        out = {}
        for name, fname in weight_map.items():
            path = directory / fname
            if not path.is_file():
                raise CheckpointError(f"{index} lists {fname} for {name!r}, but {path} does not exist: "
                                      "copy the missing shard into the folder")
            out[name] = path
        return out
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in directory.glob("*.bin"))
        hint = (f" (it has {', '.join(bins[:3])}: convert them with save_pretrained(safe_serialization=True))"
                if bins else "")
        raise CheckpointError(f"no *.safetensors files in {directory}{hint}; a checkpoint folder needs "
                              "config.json and the weights as safetensors")
    from safetensors import safe_open

    out = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                out[name] = path
    return out


# ----------------------------------------------------------------------------- the meta model
@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block lands on the meta device (buffers stay real).

    Modules allocate `torch.empty` weights in `__init__` (untouched pages, no memory) and the
    random init that follows runs on meta (no work), so a 7B model is built in a second.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _model_class(config: Any) -> Any:
    """The class config.architectures names (what save_pretrained wrote), else the causal-LM auto class."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise CheckpointError(f"{name!r} is neither a parameter nor a buffer of the model")


@dataclass
class Checkpoint:
    """A model whose parameters live in safetensors files until a submodule asks for them.

    `model` has every parameter on the meta device; `store` reads tensors; `dtype` is the
    checkpoint's floating dtype (the most common one among its tensors).
    """

    directory: Path
    config: Any
    model: nn.Module
    store: WeightStore
    dtype: torch.dtype
    aliases: dict[str, list[str]] = field(default_factory=dict)   # parameter name -> every name of that parameter

    def parameter_names(self, prefix: str = "") -> list[str]:
        """Names of the model's parameters under `prefix` (a tied parameter once, under its first name)."""
        p = prefix + "." if prefix else ""
        return [n for n, _ in self.model.named_parameters() if not prefix or n.startswith(p)]

    def tied(self, name: str) -> bool:
        """Whether the parameter is shared with another name (e.g. an lm_head tied to the embedding)."""
        return len(self.aliases.get(name, [name])) > 1

    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One parameter's real tensor (in the checkpoint's dtype, or `dtype`)."""
        return self.store.get(name, dtype)

    def materialize(self, prefix: str, dtype: torch.dtype | None = None,
                    keep_dtype: tuple[type[nn.Module], ...] = ()) -> None:
        """Load the real weights of the submodule at `prefix` (every name of a tied parameter gets the same tensor).

        Tensors of modules of a `keep_dtype` type (e.g. `nn.Embedding`) stay in the checkpoint's
        dtype whatever `dtype` says: a lookup table is copied, not computed with.
        """
        root = self.model.get_submodule(prefix) if prefix else self.model
        p = prefix + "." if prefix else ""
        done: set[int] = set()
        for mod_name, mod in root.named_modules():
            for leaf, param in list(mod._parameters.items()):
                if param is None or id(param) in done or param.device.type != "meta":
                    continue
                full = p + (f"{mod_name}.{leaf}" if mod_name else leaf)
                want = None if isinstance(mod, keep_dtype) else dtype
                real = nn.Parameter(self.store.get(full, want), requires_grad=False)
                for alias in self.aliases.get(full, [full]):
                    _set_tensor(self.model, alias, real)
                done.add(id(param))

    def release(self, prefix: str) -> None:
        """Put the submodule's parameters back on the meta device (their memory is freed)."""
        root = self.model.get_submodule(prefix) if prefix else self.model
        p = prefix + "." if prefix else ""
        for mod_name, mod in root.named_modules():
            for leaf, param in list(mod._parameters.items()):
                if param is None or param.device.type == "meta":
                    continue
                full = p + (f"{mod_name}.{leaf}" if mod_name else leaf)
                meta = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
                for alias in self.aliases.get(full, [full]):
                    _set_tensor(self.model, alias, meta)


def load_hf(directory: str | Path, *, trust_remote_code: bool = False) -> Checkpoint:
    """Open a Hugging Face checkpoint folder (config.json + *.safetensors) without loading its weights.

    Returns a `Checkpoint`: the model built from the config with parameters on the meta device,
    and a store that reads each tensor from safetensors when asked, in the checkpoint's dtype.
    Every model parameter is checked against the store here (a missing one is named now, not
    in the middle of a long run).
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist: give the folder holding "
                              "config.json and *.safetensors")
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"no config.json in {directory}: a checkpoint folder needs the model's config "
                              "(save it with model.save_pretrained or config.save_pretrained)")
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is in every extra that loads models
        raise CheckpointError("loading a Hugging Face checkpoint needs transformers: pip install -e \".[hf]\"") from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read {directory / 'config.json'}: {first}") from None
    files = _safetensors_files(directory)
    store = WeightStore(directory, files)
    cls = _model_class(config)
    with parameters_on_meta():
        if hasattr(cls, "from_config"):
            model = cls.from_config(config, trust_remote_code=trust_remote_code) if cls.__name__.startswith("Auto") \
                else cls._from_config(config)
        else:  # pragma: no cover
            model = cls(config)
    model.eval()
    # every name of each parameter (tied ones share one nn.Parameter); resolve each to a stored tensor
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    aliases: dict[str, list[str]] = {}
    missing = []
    for group in names_of.values():
        stored = [n for n in group if n in files]
        if not stored:
            missing.append(group[0])
            continue
        for n in group:
            aliases[n] = group
            if n not in files:
                store.aliases[n] = stored[0]
    if missing:
        raise CheckpointError(f"{len(missing)} parameters of {cls.__name__} are not in the safetensors files of "
                              f"{directory}, e.g. {missing[0]!r}: the config does not match the weights "
                              "(or transformers renames these tensors on load, which load_hf does not do yet)")
    # persistent buffers the checkpoint holds (e.g. running statistics) replace the init values
    for name, buf in model.named_buffers():
        if name in files and buf is not None:
            _set_tensor(model, name, store.get(name, buf.dtype))
    counts: dict[torch.dtype, int] = {}
    for name in files:
        dt = store.dtype(name)
        if dt.is_floating_point:
            counts[dt] = counts.get(dt, 0) + 1
    dtype = max(counts, key=counts.get) if counts else torch.float32
    return Checkpoint(directory, config, model, store, dtype, aliases)
