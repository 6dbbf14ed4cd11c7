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
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import RewriteError, first_line

INDEX = "model.safetensors.index.json"


class CheckpointError(RewriteError, ValueError):
    """The checkpoint folder cannot be read: the message names the file or tensor and the fix."""


# ----------------------------------------------------------------------------- the weight store
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
DTYPE_CODES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a safetensors file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int      # absolute file offsets of the raw little-endian data
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of a safetensors file (name -> TensorInfo) and its metadata, from the header alone.

    The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the raw bytes (offsets relative to the end of the header).
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than its header): re-save the checkpoint")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{path} has no valid safetensors header: re-save the checkpoint") from None
    meta = header.pop("__metadata__", None) or {}
    out = {}
    for name, e in header.items():
        if e["dtype"] not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} in {path.name} has dtype {e['dtype']}, which rewrite cannot "
                                  "read (use bf16, fp16 or fp32)")
        a, b = e["data_offsets"]
        out[name] = TensorInfo(path, _DTYPES[e["dtype"]], tuple(e["shape"]), 8 + n + a, 8 + n + b)
    return out, meta


CONVERT_CHUNK_BYTES = 1 << 26
"""Tensors above this size are read and converted to another dtype in row chunks of about this many stored bytes."""


class WeightStore:
    """Tensors of a folder's safetensors files, read one at a time (never a whole file).

    Reads are plain positioned file reads into memory the caller owns, not a memory map:
    pages of a mapped checkpoint count in the process's resident memory for as long as the
    map lives, so reading a 7B checkpoint through one would grow RSS with depth.
    `get(name)` returns the tensor in its stored dtype (or `dtype`); `rows(name, a, b)` reads
    only the bytes of rows [a, b) of the first dimension.
    """

    def __init__(self, directory: Path, tensors: dict[str, TensorInfo]):
        self.directory = directory
        self.tensors = tensors
        self.aliases: dict[str, str] = {}       # model parameter name -> checkpoint tensor name

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or name in self.aliases

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        key = name if name in self.tensors else self.aliases.get(name)
        if key is None:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint {self.directory} "
                                  f"({len(self.tensors)} tensors): the config does not match the weights; "
                                  "check config.json")
        return self.tensors[key]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def nbytes(self, name: str) -> int:
        i = self.info(name)
        return i.end - i.begin

    def read_bytes(self, name: str, start: int = 0, stop: int | None = None) -> bytearray:
        """Raw bytes [start, stop) of the tensor's data."""
        i = self.info(name)
        stop = i.end - i.begin if stop is None else stop
        buf = bytearray(stop - start)
        with open(i.path, "rb") as f:
            f.seek(i.begin + start)
            got = f.readinto(buf)
        if got != len(buf):
            raise CheckpointError(f"{i.path} is truncated: tensor {name!r} needs {len(buf)} bytes at offset "
                                  f"{i.begin + start}, the file has {got}; copy the file again")
        return buf

    def _tensor(self, name: str, buf: bytearray, shape: tuple[int, ...], dtype: torch.dtype | None) -> torch.Tensor:
        i = self.info(name)
        t = torch.frombuffer(buf, dtype=i.dtype) if len(buf) else torch.empty(0, dtype=i.dtype)
        t = t.reshape(shape)
        return t if dtype is None or dtype == t.dtype else t.to(dtype)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor; converted to `dtype` in row chunks when it is large, so a bf16 table read
        as float32 costs the float32 tensor plus one chunk, not both whole copies."""
        shape, nbytes = self.shape(name), self.nbytes(name)
        if dtype is None or dtype == self.dtype(name) or nbytes <= CONVERT_CHUNK_BYTES or len(shape) < 2:
            return self._tensor(name, self.read_bytes(name), shape, dtype)
        out = torch.empty(shape, dtype=dtype)
        step = max(1, CONVERT_CHUNK_BYTES // max(nbytes // shape[0], 1))
        for a in range(0, shape[0], step):
            out[a:a + step].copy_(self.rows(name, a, a + step))
        return out

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [start, stop) of the first dimension, read without the rest of the tensor."""
        shape = self.shape(name)
        stop = min(stop, shape[0])
        row = (self.nbytes(name) // shape[0]) if shape[0] else 0
        return self._tensor(name, self.read_bytes(name, start * row, stop * row), (stop - start, *shape[1:]), dtype)


def _safetensors_files(directory: Path) -> dict[str, TensorInfo]:
    """tensor name -> where it lies: the files the index names when there is one, else every *.safetensors."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {exc}; "
                                  "re-save the checkpoint with save_pretrained") from None
        files = []
        for name, fname in weight_map.items():
            path = directory / fname
            if not path.is_file():
                raise CheckpointError(f"{index} lists {fname} for {name!r}, but {path} does not exist: "
                                      "copy the missing shard into the folder")
            if path not in files:
                files.append(path)
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in directory.glob("*.bin"))
        hint = (f" (it has {', '.join(bins[:3])}: convert them with save_pretrained(safe_serialization=True))"
                if bins else "")
        raise CheckpointError(f"no *.safetensors files in {directory}{hint}; a checkpoint folder needs "
                              "config.json and the weights as safetensors")
    out: dict[str, TensorInfo] = {}
    for path in files:
        out.update(read_header(path)[0])
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
    lazy_buffers: set[str] = field(default_factory=set)           # buffers created on meta, read from the store

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
            for leaf, buf in list(mod._buffers.items()):
                full = p + (f"{mod_name}.{leaf}" if mod_name else leaf)
                if buf is not None and buf.device.type == "meta" and full in self.lazy_buffers:
                    _set_tensor(self.model, full, self.store.get(full))

    def module(self, dtype: torch.dtype | None = torch.float32) -> nn.Module:
        """The whole model with real weights (for models that fit in memory: `rewrite.compile(ckpt.module(), ...)`)."""
        self.materialize("", dtype)
        return self.model

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
            for leaf, buf in list(mod._buffers.items()):
                full = p + (f"{mod_name}.{leaf}" if mod_name else leaf)
                if buf is not None and full in self.lazy_buffers and buf.device.type != "meta":
                    _set_tensor(self.model, full, torch.empty_like(buf, device="meta"))


def load_hf(directory: str | Path, *, trust_remote_code: bool = False,
            prepare: Callable[[nn.Module, Any], None] | None = None) -> Checkpoint:
    """Open a Hugging Face checkpoint folder (config.json + *.safetensors) without loading its weights.

    Returns a `Checkpoint`: the model built from the config with parameters on the meta device,
    and a store that reads each tensor from safetensors when asked, in the checkpoint's dtype.
    Every model parameter is checked against the store here (a missing one is named now, not
    in the middle of a long run). `prepare(model, config)` may change the meta model first (e.g.
    swap linears for packed ones); buffers it leaves on the meta device are read from the store too.
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
        first = first_line(exc)
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
    if prepare is not None:
        prepare(model, config)
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
    # persistent buffers the checkpoint holds (e.g. running statistics) replace the init values;
    # buffers left on meta (packed weights of a rewritten checkpoint) are read on materialize
    lazy: set[str] = set()
    for name, buf in model.named_buffers():
        if buf is None:
            continue
        if buf.device.type == "meta":
            if name not in files:
                missing.append(name)
            lazy.add(name)
        elif name in files:
            _set_tensor(model, name, store.get(name, buf.dtype))
    if missing:
        raise CheckpointError(f"buffer {missing[0]!r} of {cls.__name__} is not in the safetensors files of {directory}")
    counts: dict[torch.dtype, int] = {}
    for name in files:
        dt = store.dtype(name)
        if dt.is_floating_point:
            counts[dt] = counts.get(dt, 0) + 1
    dtype = max(counts, key=counts.get) if counts else torch.float32
    return Checkpoint(directory, config, model, store, dtype, aliases, lazy)
