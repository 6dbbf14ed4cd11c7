"""Block-by-block quantization of models larger than memory (the sequential pipeline).

A decoder is a stack of repeated blocks. Holding one block's weights plus the calibration
activations is enough to quantize it, so peak memory does not grow with depth:

1. catch: the modules before the blocks (the embedding) run with real weights, loaded on
   first use; every block is replaced by a recorder that keeps the arguments the model
   passes it (hidden states of block 0; attention mask, position embeddings, ... of every
   block, so per-layer masks such as sliding windows come out right) and the run stops at
   the last block: nothing after the blocks is loaded.
2. per block i: load its weights from the checkpoint (`Checkpoint.materialize`), then for each
   group of linears that read the same input, in execution order, run the calibration
   through the block up to that input, collect its statistics (`qm.InputStats`, padded
   tokens dropped), quantize the group (`qm.gptq`/`qm.rtn`: the quantize pass's math, called
   as functions) and use the quantized weights from then on; run the calibration through the
   quantized block to get block i+1's inputs; write the packed weights; free the block.
3. tail: linears after the blocks (an untied lm_head) get their statistics from the last
   block's outputs replayed through the model's tail.

That is the in-memory pass's sequential GPTQ (`gptq.sequential: true`, each Hessian measured
on the outputs of the already-quantized layers) done one block at a time, so the two give the
same weights (tests/test_sequential.py). RTN needs no data: each weight is read, quantized
and written on its own.

The output folder holds the rewritten checkpoint: the `rewrite::linear_q` tensors of every
quantized linear (`<module>.weight_q` u8[N, ceil(K*bits/8)], `.weight_scales` f32[N, K/g],
`.weight_zeros` u8[N, K/g], the names the quantize pass gives its buffers), every other tensor
as the checkpoint stored it, in safetensors shards with an index, the config, and
`quantization.json` (bits, group size, K and method per module, peak memory per phase).
"""
from __future__ import annotations

import contextlib
import json
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from rewrite.passes import quantize_methods as qm
from rewrite.passes.quantize import QuantizeSpec, _matches, effective_group

from .checkpoint import Checkpoint, load_hf
from .errors import CalibrationError, PassError
from .inputs import Inputs
from .progress import note, showing
from .statistics import shape_token_rows

SHARD_BYTES = 1 << 28          # output shard size (at most; every block also ends its shard)
ROW_CHUNK_ELEMENTS = 1 << 21
"""RTN reads and quantizes weights in chunks of rows of about this many elements. RTN is row-wise,
so the result is the same, and packing (`kernels.quant.pack` expands every value into `bits`
int32 lanes, ~64 bytes of temporaries per weight: 1 GB for one 4096 x 4096) stays ~130 MB."""
GPTQ_ROW_CHUNK_ELEMENTS = 1 << 22
"""GPTQ rows are independent given the Hessian's factor, which the chunks share, so large weights are
fitted in chunks of rows too: GPTQ's float64 working copies (weight, codes, the lazy update)
are ~100 MB per chunk, not 3 x 360 MB for a 7B down_proj."""
GPTQ_ACT_ORDER_ROW_CHUNK_ELEMENTS = 1 << 24
"""With act_order every chunk factors its own permuted Hessian, so the chunks are larger."""


# ----------------------------------------------------------------------------- memory per phase
@dataclass
class Phase:
    name: str
    seconds: float
    peak_rss_mb: float
    scope: str   # "phase" (peak reset at its start) or "process" (peak since the process started)


def peak_rss_mb(phases: list[Phase]) -> float:
    """The highest peak resident memory of any phase."""
    return max((p.peak_rss_mb for p in phases), default=0.0)


def phases_table(phases: list[Phase]) -> str:
    """Wall time and peak RSS per phase as a markdown table (a process-wide peak is marked)."""
    rows = ["| phase | wall s | peak RSS MB |", "|---|---:|---:|"]
    for p in phases:
        rows.append(f"| {p.name} | {p.seconds:.2f} | {p.peak_rss_mb:.0f}{'' if p.scope == 'phase' else ' (process)'} |")
    return "\n".join(rows)


class MemoryMeter:
    """Wall time and peak resident memory per phase.

    On Linux the kernel's high-water mark (VmHWM) is reset at each phase start by writing 5 to
    /proc/self/clear_refs, so each phase reports its own peak; elsewhere the process peak
    (`getrusage`) is reported and marked as such.
    """

    def __init__(self) -> None:
        self.phases: list[Phase] = []
        self._resettable = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _peak_mb() -> float:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        resettable = self._resettable and self._reset()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases.append(Phase(name, time.perf_counter() - start, self._peak_mb(),
                                     "phase" if resettable else "process"))

    def peak_mb(self) -> float:
        return max((p.peak_rss_mb for p in self.phases), default=self._peak_mb())


def return_freed_memory() -> None:
    """Hand memory freed by the C allocator back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Tensors between 128 KB and 32 MB come from glibc's heap once its dynamic mmap threshold has
    grown, and freed heap memory in the middle of the heap stays resident: without a trim after
    each block, RSS crept up by ~130 MB per block of a 1B-size model (measured), i.e. with depth.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------- finding the blocks
def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the nn.ModuleList of same-class children holding the most parameters.

    Generic over architectures (Llama's `model.layers`, GPT-2's `transformer.h`, ...): no names
    are looked up. Works on meta parameters (counts numel, not bytes).
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 1:
            continue
        if len({type(c) for c in mod}) != 1:
            continue
        numel = sum(p.numel() for p in mod.parameters())
        if numel and (best is None or numel > best[0]):
            best = (numel, path, mod)
    if best is None:
        raise PassError(f"{type(model).__name__} has no repeated blocks (an nn.ModuleList of same-class layers "
                        "with parameters): the sequential pipeline needs a stack of blocks; use rewrite.compile")
    return best[1], best[2]


# ----------------------------------------------------------------------------- targets
@dataclass
class Linear:
    """One weight the pipeline quantizes: an nn.Linear, or a Conv1D (GPT-2) whose weight is stored [K, N]."""

    path: str
    module: nn.Module
    transposed: bool
    n: int
    k: int
    bits: int = 0
    group_size: int = 0

    @property
    def weight_name(self) -> str:
        return f"{self.path}.weight"


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (y = x @ W + b, W: [K, N]); matched by its contract, not imported."""
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2 and hasattr(m, "nf")


def find_linears(ckpt: Checkpoint, root: nn.Module, prefix: str, spec: QuantizeSpec) -> list[Linear]:
    """The linears under `root` the spec's scope/exclude select (the quantize pass's glob rules);
    tied weights stay float, as in the pass (a shared weight has two users)."""
    out = []
    p = prefix + "." if prefix else ""
    for name, m in root.named_modules():
        path = p + name if name else prefix
        if isinstance(m, nn.Linear):
            kind, transposed = "linear", False
        elif _is_conv1d(m):
            kind, transposed = "addmm", True
        else:
            continue
        patterns = spec.scope if spec.scope is not None else ["linear", "conv"]
        if not _matches(path, kind, patterns) or (spec.exclude and _matches(path, kind, spec.exclude)):
            continue
        if ckpt.tied(f"{path}.weight"):
            continue
        shape = tuple(m.weight.shape)
        n, k = (shape[1], shape[0]) if transposed else shape
        bits = int(spec.weights.bits)
        out.append(Linear(path, m, transposed, n, k, bits, effective_group(k, spec.weights.group_size)))
    return out


def _float_weight(lin: Linear, w: torch.Tensor) -> torch.Tensor:
    """[N, K] float32, the layout the quantizers take (the pass's `float_weight`)."""
    w = w.detach().to(torch.float32)
    return w.T.contiguous() if lin.transposed else w


def _set_weight(lin: Linear, w_hat: torch.Tensor) -> None:
    """Make the module compute with the quantized weight (dequantized, in its stored layout)."""
    value = w_hat.T.contiguous() if lin.transposed else w_hat
    lin.module._parameters["weight"] = nn.Parameter(value.to(lin.module.weight.dtype), requires_grad=False)


def by_rows(n: int, k: int, chunk_elements: int, quantize: Callable[[int, int], qm.Quantized]) -> qm.Quantized:
    """`quantize(a, b)` of rows [a, b) in chunks of about `chunk_elements`, concatenated (one call when it fits)."""
    step = max(1, chunk_elements // max(k, 1))
    if n <= step:
        return quantize(0, n)
    parts = [quantize(a, min(a + step, n)) for a in range(0, n, step)]
    p0 = parts[0]
    return qm.Quantized(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                        torch.cat([p.zeros for p in parts]), p0.bits, p0.group_size, p0.k)


# ----------------------------------------------------------------------------- output
@dataclass
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    tensor: torch.Tensor | None = None                       # held until its shard is written
    chunks: Callable[[], Iterable[Any]] | None = None        # or streamed from the source when written


def _raw(t: torch.Tensor) -> Any:
    """The tensor's bytes as a buffer (a view, no copy)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


class ShardWriter:
    """Tensors written as safetensors shards of about `shard_bytes`, plus the index.

    The file format is written directly (an 8-byte header length, the JSON header, the raw
    bytes) so that nothing is serialised to one buffer first: computed tensors are held until
    their shard is written (at most one shard's worth), and tensors copied unchanged from the
    checkpoint (`copy`) are streamed from its file in chunks, never held whole.
    """

    def __init__(self, directory: Path, shard_bytes: int = SHARD_BYTES):
        self.directory = directory
        self.shard_bytes = shard_bytes
        self.pending: list[_Entry] = []
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.shards = 0
        self.total_bytes = 0

    def _queue(self, e: _Entry) -> None:
        if e.name in self.weight_map or any(p.name == e.name for p in self.pending):
            raise PassError(f"tensor {e.name!r} written twice")
        self.pending.append(e)
        self.pending_bytes += e.nbytes
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous()
        self._queue(_Entry(name, t.dtype, tuple(t.shape), t.numel() * t.element_size(), tensor=t))

    def copy(self, name: str, store: Any, chunk_bytes: int = 1 << 26) -> None:
        """Tensor `name` of a `WeightStore`, byte for byte, read in chunks when its shard is written."""
        n = store.nbytes(name)

        def chunks() -> Iterator[Any]:
            for a in range(0, n, chunk_bytes):
                yield store.read_bytes(name, a, min(a + chunk_bytes, n))

        self._queue(_Entry(name, store.dtype(name), store.shape(name), n, chunks=chunks))

    def flush(self) -> None:
        if not self.pending:
            return
        from .checkpoint import DTYPE_CODES

        fname = f"rewritten-{self.shards:05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for e in self.pending:
            header[e.name] = {"dtype": DTYPE_CODES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(self.directory / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for e in self.pending:
                if e.tensor is not None:
                    if e.nbytes:
                        f.write(_raw(e.tensor))
                else:
                    for chunk in e.chunks():
                        f.write(chunk)
                self.weight_map[e.name] = fname
        self.total_bytes += offset
        self.shards += 1
        self.pending, self.pending_bytes = [], 0

    def close(self, metadata: dict[str, Any]) -> None:
        self.flush()
        index = {"metadata": {"total_size": self.total_bytes, **metadata}, "weight_map": self.weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


# ----------------------------------------------------------------------------- running blocks
class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it wanted has been seen."""


@dataclass
class _Call:
    """The arguments the model passed one block for one calibration batch."""

    args: tuple
    kwargs: dict

    def with_hidden(self, h: torch.Tensor) -> tuple[tuple, dict]:
        if self.args:
            return (h, *self.args[1:]), self.kwargs
        return self.args, {**self.kwargs, "hidden_states": h}

    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def drop_hidden(self) -> None:
        """Forget the recorded hidden states (every block gets them from `with_hidden`), so the
        pipeline's own list is their only holder and each block's outputs can replace them."""
        if self.args:
            self.args = (None, *self.args[1:])
        else:
            self.kwargs = {**self.kwargs, "hidden_states": None}


def _hidden_of(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _cast_floats(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(_cast_floats(v, dtype) for v in x)
    if isinstance(x, list):
        return [_cast_floats(v, dtype) for v in x]
    if isinstance(x, dict):
        return {k: _cast_floats(v, dtype) for k, v in x.items()}
    return x


@contextlib.contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _outside_blocks_on_demand(ckpt: Checkpoint, blocks_path: str, dtype: torch.dtype) -> Iterator[list[str]]:
    """Modules outside the blocks load their own weights the first time they run (and are freed on exit).

    Embedding tables stay in the checkpoint's dtype and their output is cast to `dtype` (a lookup
    copies rows, so the cast gives exactly the float32 model's values at half the memory).
    """
    loaded: list[str] = []
    handles = []
    for path, mod in ckpt.model.named_modules():
        if path == blocks_path or path.startswith(blocks_path + ".") or not mod._parameters:
            continue
        if not any(p is not None and p.device.type == "meta" for p in mod._parameters.values()):
            continue

        def load(m: nn.Module, args: Any, path: str = path) -> None:
            if any(p is not None and p.device.type == "meta" for p in m._parameters.values()):
                _materialize_own(ckpt, path, m, dtype)
                loaded.append(path)

        handles.append(mod.register_forward_pre_hook(load))
        if isinstance(mod, nn.Embedding):
            handles.append(mod.register_forward_hook(lambda m, a, out: _cast_floats(out, dtype)))
    try:
        with _hooks(handles):
            yield loaded
    finally:
        for path in loaded:
            _release_own(ckpt, path)


def _materialize_own(ckpt: Checkpoint, path: str, mod: nn.Module, dtype: torch.dtype) -> None:
    """Load the module's own parameters (not its children's)."""
    from .checkpoint import _set_tensor

    for leaf, p in list(mod._parameters.items()):
        if p is None or p.device.type != "meta":
            continue
        full = f"{path}.{leaf}" if path else leaf
        want = None if isinstance(mod, nn.Embedding) else dtype
        real = nn.Parameter(ckpt.store.get(full, want), requires_grad=False)
        for alias in ckpt.aliases.get(full, [full]):
            _set_tensor(ckpt.model, alias, real)


def _release_own(ckpt: Checkpoint, path: str) -> None:
    from .checkpoint import _set_tensor

    mod = ckpt.model.get_submodule(path) if path else ckpt.model
    for leaf, p in list(mod._parameters.items()):
        if p is None or p.device.type == "meta":
            continue
        full = f"{path}.{leaf}" if path else leaf
        meta = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for alias in ckpt.aliases.get(full, [full]):
            _set_tensor(ckpt.model, alias, meta)


def _stop(*_: Any) -> None:
    raise _Stop


@contextlib.contextmanager
def _replaced_forwards(blocks: nn.ModuleList, make: Callable[[int], Callable[..., Any]]) -> Iterator[None]:
    """Each block's forward replaced by `make(i)` for the duration (an instance attribute, removed on exit)."""
    try:
        for i, b in enumerate(blocks):
            b.forward = make(i)
        yield
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)


def catch_block_inputs(ckpt: Checkpoint, blocks_path: str, blocks: nn.ModuleList, batches: list[Inputs],
                       dtype: torch.dtype) -> list[list[_Call]]:
    """calls[i][b]: the arguments block i receives for batch b (hidden states meaningful for block 0 only).

    Every block is replaced by a recorder that returns its input unchanged, and the last one
    stops the run, so only the modules before the blocks compute (with real weights).
    """
    calls: list[list[_Call]] = [[] for _ in blocks]
    last = len(blocks) - 1

    def recorder(i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            call = _Call(_cast_floats(tuple(args), dtype), _cast_floats(dict(kwargs), dtype))
            calls[i].append(call)
            if i == last:
                raise _Stop
            return call.hidden()
        return forward

    with _replaced_forwards(blocks, recorder), _outside_blocks_on_demand(ckpt, blocks_path, dtype), torch.no_grad():
        for batch in batches:
            try:
                batch.call(ckpt.model)
            except _Stop:
                continue
            raise PassError(f"the model returned without reaching its last block ({blocks_path}.{last}); "
                            "the sequential pipeline needs every block to run")
    return calls


def _run_block(block: nn.Module, call: _Call, h: torch.Tensor) -> torch.Tensor:
    args, kwargs = call.with_hidden(h)
    return _hidden_of(block(*args, **kwargs))


def input_groups(linears: list[Linear], run_first: Callable[[], Any]) -> list[list[Linear]]:
    """The linears grouped by the tensor they read, in execution order (one probe forward, `run_first`).

    q/k/v read one normed input: one group, one set of statistics, as in the pass (one input
    node). The probe stops once every linear has been seen, before the last one computes (so a
    tail linear's weight is never loaded for it). Linears the probe never reaches come last, alone.
    """
    seen: list[tuple[Linear, torch.Tensor]] = []
    handles = []
    for lin in linears:
        def hook(m: nn.Module, args: tuple, lin: Linear = lin) -> None:
            if all(l is not lin for l, _ in seen):
                seen.append((lin, args[0]))
            if len(seen) == len(linears):
                raise _Stop
        handles.append(lin.module.register_forward_pre_hook(hook, prepend=True))
    with _hooks(handles), torch.no_grad():
        try:
            run_first()
        except _Stop:
            pass
    groups: list[tuple[torch.Tensor, list[Linear]]] = []
    for lin, x in seen:
        for gx, members in groups:
            if gx is x:
                members.append(lin)
                break
        else:
            groups.append((x, [lin]))
    reached = {id(l) for l, _ in seen}
    return [m for _, m in groups] + [[l] for l in linears if id(l) not in reached]


def group_stats(first: Linear, run_batch: Callable[[int], Any], batches: list[Inputs]) -> qm.InputStats:
    """Statistics of `first`'s input over every batch (padded tokens dropped), each forward stopped there."""
    st = qm.InputStats(first.k)
    current: list[Inputs] = []

    def hook(m: nn.Module, args: tuple) -> None:
        st.update(shape_token_rows(current[-1], args[0].to(torch.float32)), want_gram=True)
        raise _Stop

    handle = first.module.register_forward_pre_hook(hook, prepend=True)
    with _hooks([handle]), torch.no_grad():
        for b, batch in enumerate(batches):
            current.append(batch)
            try:
                run_batch(b)
            except _Stop:
                continue
    return st


# ----------------------------------------------------------------------------- the pipeline
@dataclass
class SequentialResult:
    """What the pipeline wrote and what it cost."""

    out_dir: Path
    layers: list[dict[str, Any]]
    phases: list[Phase]
    notes: list[str] = field(default_factory=list)

    @property
    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.phases)

    def table(self) -> str:
        return phases_table(self.phases)


def _spec(spec: QuantizeSpec | dict) -> QuantizeSpec:
    s = spec if isinstance(spec, QuantizeSpec) else QuantizeSpec.model_validate({"kind": "quantize", **spec})
    unsupported = unsupported_features(s)
    if unsupported:
        raise PassError(f"the sequential pipeline does not support {', '.join(unsupported)} yet: use method rtn or "
                        "gptq with uniform weights.bits, or rewrite.compile on a model that fits in memory")
    return s


def unsupported_features(s: QuantizeSpec) -> list[str]:
    """What in a quantize spec the pipeline cannot do (empty: it runs the spec block by block)."""
    unsupported = []
    if s.weights is None:
        unsupported.append("a spec without weights")
    if s.method not in ("rtn", "gptq"):
        unsupported.append(f"method {s.method}")
    if s.allocate != "uniform" or (s.weights is not None and isinstance(s.weights.bits, list)):
        unsupported.append("mixed precision (allocate: layerwise)")
    if s.activations is not None:
        unsupported.append("int8 activations")
    if s.embeddings is not None:
        unsupported.append("embeddings")
    if s.method == "gptq" and s.gptq.token_weight != "uniform":
        unsupported.append(f"gptq.token_weight: {s.gptq.token_weight}")
    if s.method == "gptq" and s.gptq.target != "quantized":
        unsupported.append(f"gptq.target: {s.gptq.target}")
    return unsupported


def quantize_sequential(checkpoint: Checkpoint | str | Path, spec: QuantizeSpec | dict, out_dir: str | Path, *,
                        calibration: Iterable[Any] | None = None, dtype: torch.dtype = torch.float32,
                        progress: bool | None = None) -> SequentialResult:
    """Quantize a checkpoint block by block and write the rewritten checkpoint to `out_dir`.

    `spec`: a quantize pass spec (`QuantizeSpec` or its dict; method rtn or gptq, uniform bits).
    `calibration`: batches of model inputs (dicts of keyword arguments, like `rewrite.compile`
    takes), needed by GPTQ; RTN reads none. `dtype`: the precision blocks compute in.
    GPTQ here is always sequential: each group of linears gets its Hessian from the outputs of
    the already-quantized layers (the pass's `gptq.sequential: true`).
    """
    s = _spec(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meter = MemoryMeter()
    with showing(progress):
        with meter.phase("load"):
            ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_hf(checkpoint)
            if out.resolve() == ckpt.directory.resolve():
                raise PassError(f"out_dir {out} is the checkpoint folder itself: writing there would replace its "
                                "index and config; give another folder")
            if hasattr(ckpt.model.config, "use_cache"):
                ckpt.model.config.use_cache = False
            blocks_path, blocks = find_blocks(ckpt.model)
        batches = [Inputs.of(b) for b in calibration] if calibration is not None else []
        if s.method == "gptq" and not batches:
            raise CalibrationError("method gptq needs calibration data: pass calibration=<batches of model inputs>")
        notes: list[str] = []
        if s.method == "rtn" and batches:
            notes.append("rtn reads no calibration data; the batches were not used")
        if s.method == "gptq" and not s.gptq.sequential:
            notes.append("GPTQ in the sequential pipeline measures every Hessian on the already-quantized prefix "
                         "(gptq.sequential: true), whatever the spec says")
        run = _Run(ckpt, s, out, meter, blocks_path, blocks, batches if s.method == "gptq" else [], dtype, notes)
        run.go()
    return SequentialResult(out, run.rows, meter.phases, notes)


class _Run:
    """One pipeline run (state shared by its phases)."""

    def __init__(self, ckpt: Checkpoint, spec: QuantizeSpec, out: Path, meter: MemoryMeter, blocks_path: str,
                 blocks: nn.ModuleList, batches: list[Inputs], dtype: torch.dtype, notes: list[str]):
        self.ckpt, self.spec, self.out, self.meter = ckpt, spec, out, meter
        self.blocks_path, self.blocks, self.batches, self.dtype, self.notes = blocks_path, blocks, batches, dtype, notes
        self.writer = ShardWriter(out)
        self.rows: list[dict[str, Any]] = []
        self.written: set[str] = set()

    # -- helpers ---------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        g = self.spec.gptq
        return {"act_order": g.act_order, "damp": g.damp, "clip_search": g.clip_search, "refit_rounds": g.refit_rounds}

    def _write_quantized(self, lin: Linear, qz: qm.Quantized, method: str, rel_error: float | None) -> None:
        for suffix, t in (("q", qz.qweight), ("scales", qz.scales), ("zeros", qz.zeros)):
            self.writer.add(f"{lin.weight_name}_{suffix}", t)
        self.written.add(lin.weight_name)
        row = {"module": lin.path, "n": lin.n, "k": lin.k, "bits": qz.bits, "group": qz.group_size, "method": method}
        if rel_error is not None:
            row["rel_error"] = round(rel_error, 5)
        self.rows.append(row)

    def _copy_rest(self, prefix: str, inside: Callable[[str], bool]) -> None:
        """Every stored tensor under `prefix` not written yet, as the checkpoint stores it (one at a time)."""
        for name in self.ckpt.store.names():
            if name in self.written or not inside(name):
                continue
            self.writer.copy(name, self.ckpt.store)
            self.written.add(name)

    def _rtn_streamed(self, lin: Linear) -> qm.Quantized:
        """RTN of a weight read from the checkpoint in row chunks (RTN is row-wise: the same result)."""
        name, sym = lin.weight_name, self.spec.weights.symmetric
        if lin.transposed:  # stored [K, N]: rows of the stored tensor are columns of W
            return qm.rtn(_float_weight(lin, self.ckpt.load(name)), lin.bits, lin.group_size, sym)
        return by_rows(lin.n, lin.k, ROW_CHUNK_ELEMENTS, lambda a, b: qm.rtn(
            self.ckpt.store.rows(name, a, b, torch.float32), lin.bits, lin.group_size, sym))

    # -- phases ----------------------------------------------------------------------------
    def go(self) -> None:
        ckpt, n_blocks = self.ckpt, len(self.blocks)
        outside = [l for l in find_linears(ckpt, ckpt.model, "", self.spec)
                   if not l.path.startswith(self.blocks_path + ".")]
        calls: list[list[_Call]] = []
        hidden: list[torch.Tensor] = []
        if self.batches:
            with self.meter.phase("catch block inputs"):
                head_called = self._head_linears_called(outside)
                if head_called:
                    path = head_called[0].path
                    raise PassError(f"{path} runs before the first block; the sequential GPTQ does not handle linears "
                                    f"there yet: exclude it (exclude: [{path}]) or use method rtn")
                calls = catch_block_inputs(ckpt, self.blocks_path, self.blocks, self.batches, self.dtype)
                hidden = [c.hidden() for c in calls[0]]
                for block_calls in calls:
                    for c in block_calls:
                        c.drop_hidden()
        for i in range(n_blocks):
            prefix = f"{self.blocks_path}.{i}"
            start = time.perf_counter()
            with self.meter.phase(f"block {i}"):
                linears = find_linears(ckpt, self.blocks[i], prefix, self.spec)
                if self.batches:
                    hidden = self._block_gptq(i, linears, calls[i], hidden)
                else:
                    for lin in linears:
                        self._write_quantized(lin, self._rtn_streamed(lin), "rtn", None)
                self._copy_rest(prefix, lambda n, p=prefix + ".": n.startswith(p))
                self.writer.flush()   # one shard per block: nothing computed is held across blocks
                return_freed_memory()
            note(f"block {i + 1}/{n_blocks}: {len(linears)} linears ({self.spec.method}) in "
                 f"{time.perf_counter() - start:.1f}s, peak RSS {self.meter.phases[-1].peak_rss_mb:.0f} MB")
        with self.meter.phase("outside the blocks"):
            if self.batches and outside:
                self._tail_gptq(outside, hidden)
            else:
                for lin in outside:
                    self._write_quantized(lin, self._rtn_streamed(lin), "rtn", None)
            self._copy_rest("", lambda n: True)
            self._finish()

    def _head_linears_called(self, outside: list[Linear]) -> list[Linear]:
        """Linears outside the blocks that run before block 0 (probed on the first batch)."""
        if not outside:
            return []
        called: list[Linear] = []
        handles = [self.blocks[0].register_forward_pre_hook(_stop, prepend=True)]
        for lin in outside:
            handles.append(lin.module.register_forward_pre_hook(lambda m, a, lin=lin: called.append(lin), prepend=True))
        with _hooks(handles), _outside_blocks_on_demand(self.ckpt, self.blocks_path, self.dtype), torch.no_grad():
            try:
                self.batches[0].call(self.ckpt.model)
            except _Stop:
                pass
        return called

    def _block_gptq(self, i: int, linears: list[Linear], calls: list[_Call], hidden: list[torch.Tensor]
                    ) -> list[torch.Tensor]:
        """GPTQ of one block's linears, group after group; returns the quantized block's outputs."""
        ckpt, prefix, block = self.ckpt, f"{self.blocks_path}.{i}", self.blocks[i]
        ckpt.materialize(prefix, self.dtype)
        try:
            def run_batch(b: int) -> torch.Tensor:
                return _run_block(block, calls[b], hidden[b])

            self._gptq_groups(input_groups(linears, lambda: run_batch(0)), run_batch)
            with torch.no_grad():
                for b in range(len(calls)):   # each batch's output replaces its input: one set of activations
                    hidden[b] = run_batch(b)
            return hidden
        finally:
            ckpt.release(prefix)

    def _gptq_groups(self, groups: list[list[Linear]], run_batch: Callable[[int], Any]) -> None:
        """Each group's statistics on the already-quantized prefix, then GPTQ of its members;
        the quantized weights replace the float ones before the next group is measured."""
        sym = self.spec.weights.symmetric
        options = self._options()
        for group in groups:
            st = group_stats(group[0], run_batch, self.batches)
            # the float32 Hessian is all that is used from here: the float64 sum (K x K, 0.5 GB at K = 8192)
            # is divided in place and dropped
            hessian = st.take_hessian() if st.rows else None
            st.gram = None
            # one factor per group (the members read the same input), except with act_order (a permuted H each)
            factor = qm.gptq_factor(hessian, options["damp"]) if st.rows and not options["act_order"] else None
            for lin in group:
                if lin.module.weight.device.type == "meta":  # a tail linear: loaded only for its fit
                    _materialize_own(self.ckpt, lin.path, lin.module, self.dtype)
                w = _float_weight(lin, lin.module.weight)
                if st.rows == 0:
                    qz, method, err = qm.rtn(w, lin.bits, lin.group_size, sym), "rtn (not reached by calibration)", None
                else:
                    chunk = GPTQ_ROW_CHUNK_ELEMENTS if factor else GPTQ_ACT_ORDER_ROW_CHUNK_ELEMENTS
                    qz = by_rows(lin.n, lin.k, chunk, lambda a, b: qm.gptq_refined(
                        w[a:b], hessian, lin.bits, lin.group_size, sym, **options, factor=factor))
                    method = "gptq"
                w_hat = qz.weight()
                if st.rows:
                    err = qm.output_error(w, w_hat, st, hessian=hessian)
                del w   # the float weight goes as soon as its codes exist (the module now holds w_hat)
                _set_weight(lin, w_hat)
                del w_hat
                self._write_quantized(lin, qz, method, err)
            del factor, hessian

    def _tail_gptq(self, outside: list[Linear], hidden: list[torch.Tensor]) -> None:
        """Linears after the blocks: the last block's outputs replayed through the model's tail.

        Every block becomes a pass-through except the last, which returns the stored outputs of
        the real last block for the current batch; the tail's modules load on first use.
        """
        ckpt, last = self.ckpt, len(self.blocks) - 1
        current = [0]

        def replay(i: int) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> Any:
                return hidden[current[0]] if i == last else (args[0] if args else kwargs["hidden_states"])
            return forward

        def run_batch(b: int) -> Any:
            current[0] = b
            return self.batches[b].call(ckpt.model)

        with _replaced_forwards(self.blocks, replay), _outside_blocks_on_demand(ckpt, self.blocks_path, self.dtype):
            groups = input_groups(outside, lambda: run_batch(0))
            try:
                self._gptq_groups(groups, run_batch)
            finally:
                for lin in outside:
                    _release_own(ckpt, lin.path)

    def _finish(self) -> None:
        s = self.spec
        meta = {"format": "rewrite-linear_q", "method": s.method, "bits": int(s.weights.bits),
                "group_size": s.weights.group_size, "symmetric": s.weights.symmetric}
        self.writer.close({"rewrite": json.dumps(meta)})
        src = self.ckpt.directory / "config.json"
        if src.is_file():
            shutil.copyfile(src, self.out / "config.json")
        report = {"quantization": meta, "modules": self.rows, "notes": self.notes,
                  "phases": [asdict(p) for p in self.meter.phases]}
        (self.out / "quantization.json").write_text(json.dumps(report, indent=1))


# ----------------------------------------------------------------------------- reading the output
class PackedLinear(nn.Module):
    """A linear whose weight is stored packed: `rewrite::linear_q` on `weight_q/_scales/_zeros`.

    Built on the meta device by `load_rewritten` and filled from the rewritten checkpoint, so a
    torch user runs the quantized model with 4-bit storage (and the graph it captures carries
    `rewrite::linear_q`, which every backend lowers).
    """

    def __init__(self, n: int, k: int, bits: int, group_size: int, bias: torch.Tensor | None):
        super().__init__()
        from rewrite.kernels.quant import packed_width

        self.in_features, self.out_features, self.bits, self.group_size = k, n, bits, group_size
        self.register_buffer("weight_q", torch.empty(n, packed_width(k, bits), dtype=torch.uint8, device="meta"))
        self.register_buffer("weight_scales", torch.empty(n, k // group_size, dtype=torch.float32, device="meta"))
        self.register_buffer("weight_zeros", torch.empty(n, k // group_size, dtype=torch.uint8, device="meta"))
        self.bias = None if bias is None else nn.Parameter(torch.empty(n, device="meta"), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import rewrite.kernels.quant  # noqa: F401 - registers rewrite::linear_q

        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.ops.rewrite.linear_q(x, self.weight_q, self.weight_scales, self.weight_zeros, bias,
                                          self.bits, self.group_size)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def load_rewritten(directory: str | Path) -> Checkpoint:
    """A folder written by `quantize_sequential`, opened like `load_hf`: every quantized linear is a
    `PackedLinear` (on meta until `materialize`), everything else as in the source model."""
    directory = Path(directory)
    qfile = directory / "quantization.json"
    if not qfile.is_file():
        from .checkpoint import CheckpointError

        raise CheckpointError(f"no quantization.json in {directory}: it is not a folder written by quantize_sequential "
                              "(open a plain checkpoint with rewrite.load_hf)")
    modules = json.loads(qfile.read_text())["modules"]

    def prepare(model: nn.Module, config: Any) -> None:
        for row in modules:
            owner_path, _, leaf = row["module"].rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            old = getattr(owner, leaf)
            setattr(owner, leaf, PackedLinear(row["n"], row["k"], row["bits"], row["group"], getattr(old, "bias", None)))

    return load_hf(directory, prepare=prepare)
