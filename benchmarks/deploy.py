"""One spec, all rewrites: the deploy spec and the budget allocator on all-MiniLM-L6-v2.

Measures, side by side in one run against the fp32 export: STS-B dev Spearman, exported
ONNX size and onnxruntime CPU throughput at batch 32 x 128 tokens, for each single
technique, the peers, the composed deploy spec and `budget: {latency: 0.5}`. With
`--readme` it rewrites the results table in README.md (between the RESULTS markers).

    python benchmarks/deploy.py [--readme] [--pairs N] [--rows fp32,deploy,...]
"""
from __future__ import annotations

import os as _os
import sys as _sys

# Run as a script, this folder is sys.path[0] and benchmarks/token.py would shadow the
# standard library's `token` module: drop the folder, keep the repo root importable.
_HERE = _os.path.dirname(_os.path.abspath(__file__))
_sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _HERE] + [_os.path.dirname(_HERE)]

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import rewrite
from benchmarks.timing_lock import timing_lock
from rewrite import demo

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent
BATCH, SEQ = 32, 128


@dataclass
class Row:
    name: str
    kind: str  # ours | peer | reference
    spearman: float
    mb: float
    onnx_path: Path | None
    seconds: float = float("nan")


def ort_session(path: Path):
    from rewrite.backends.onnx import session

    return session(path)


def throughput_table(paths: dict[str, Path], feeds: dict[str, np.ndarray], rounds: int = 7) -> dict[str, float]:
    """Median seconds per batch for each model, measured interleaved (A, B, C, A, B, C, ...)."""
    sessions = {}
    for name, p in paths.items():
        s = ort_session(p)
        names = {i.name for i in s.get_inputs()}
        sessions[name] = (s, {k: v for k, v in feeds.items() if k in names})
        s.run(None, sessions[name][1])
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(rounds):
        for name, (s, f) in sessions.items():
            t0 = time.perf_counter()
            s.run(None, f)
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def _robustness():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_robustness", Path(_HERE) / "robustness.py")
    rb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rb)
    return rb


def sts_dev(fn, tok, pairs: int | None) -> float:
    """STS-B dev Spearman x100 (demo.sts_score's recipe, sentences batched by length: robustness.score)."""
    return _robustness().score(fn, tok, demo.sts_pairs("dev", pairs))


def calibration(tok, samples: int, pad: str) -> list:
    """`samples` STS-B train sentences outside the selection split (benchmarks/robustness.py, the split the
    defaults were chosen on), batches of 16 padded to `pad` tokens or to the longest of each batch."""
    rb = _robustness()
    pool, _, _ = rb.splits()
    return rb.calibration(tok, pool, samples, pad)


def ort_callable(path: Path) -> Callable[..., Any]:
    sess = ort_session(path)
    names = {i.name for i in sess.get_inputs()}

    def run(**kwargs: torch.Tensor) -> torch.Tensor:
        feeds = {k: v.numpy() for k, v in kwargs.items() if k in names}
        return torch.from_numpy(sess.run(None, feeds)[0])

    return run


def compile_row(name: str, spec: dict, model, tok, calib, out: Path, pairs: int | None) -> Row:
    t0 = time.perf_counter()
    compiled = rewrite.compile(copy.deepcopy(model), spec, example_inputs=demo.example_inputs(tok), calibration=calib)
    path = out / f"{name.replace(' ', '_').replace('/', '_')}.onnx"
    rec = compiled.export(path, verify_inputs=compiled.verification_batches())
    score = sts_dev(compiled.module, tok, pairs)
    for record in compiled.report.passes:  # the budget allocator's plan, for the notes
        for plan in record.details.get("plans (chosen and rejected)", []) if record.kind == "budget" else []:
            print(f"  {name}: {' + '.join(plan['knobs'])}: {plan['verdict']} (predicted latency "
                  f"{plan['predicted_latency']:.2f}, measured {plan['measured_latency']})", flush=True)
    return Row(name, "ours", score, rec.bytes / 1e6, path, time.perf_counter() - t0)


def compile_rows(specs: dict[str, dict], model, tok, calib, out: Path, pairs: int | None) -> list[Row]:
    """One row per spec; a spec that fails is reported and left out, the table goes on."""
    rows = []
    for name, spec in specs.items():
        try:
            rows.append(compile_row(name, spec, model, tok, calib, out, pairs))
            print(f"{name}: {rows[-1].spearman:.2f}", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"({name} failed: {exc})", file=sys.stderr)
    return rows


def peer_rows(fp32_path: Path, out: Path, tok, pairs: int | None) -> list[Row]:
    rows = []
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        p = out / "ort_dynamic_int8.onnx"
        quantize_dynamic(str(fp32_path), str(p), weight_type=QuantType.QInt8)
        rows.append(Row("onnxruntime quantize_dynamic (int8)", "peer", sts_dev(ort_callable(p), tok, pairs), p.stat().st_size / 1e6, p))
    except Exception as exc:  # noqa: BLE001
        print(f"(peer quantize_dynamic failed: {exc})", file=sys.stderr)
    try:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), block_size=32, is_symmetric=True)
        q.process()
        p = out / "ort_matmulnbits_int4.onnx"
        q.model.save_model_to_file(str(p), False)
        rows.append(Row("onnxruntime MatMulNBits (int4)", "peer", sts_dev(ort_callable(p), tok, pairs), p.stat().st_size / 1e6, p))
    except Exception as exc:  # noqa: BLE001
        print(f"(peer MatMulNBits failed: {exc})", file=sys.stderr)
    return rows


SINGLE = {
    "skip 2 blocks (beam fidelity)": {"passes": [{"kind": "skip", "layers": 2, "search": "beam", "importance": "fidelity_drop"}]},
    "block influence skip 2 (ShortGPT, peer)": {"passes": [{"kind": "skip", "layers": 2, "search": "oneshot", "importance": "block_influence"}]},
    "prune heads+FFN 25%": {"passes": [{"kind": "prune", "granularity": "head", "amount": 0.25, "compensate": "lstsq"},
                                        {"kind": "prune", "granularity": "neuron", "amount": 0.25, "compensate": "lstsq"}]},
    "tokens keep 0.7 after layer 2": {"passes": [{"kind": "token", "keep": 0.7, "after": [2]}]},
    "W4 + 4-bit embeddings (AWQ)": {"passes": [{"kind": "quantize", "method": "awq", "weights": {"bits": 4, "group_size": 32}, "embeddings": 4}]},
    "W4A8 (GPTQ, int8 compute) + 4-bit embeddings": {"passes": [{
        "kind": "quantize", "method": "gptq", "weights": {"bits": 4, "group_size": 64, "symmetric": True},
        "activations": {"mode": "dynamic"}, "embeddings": 4, "embeddings_group_size": 128}]},
}


DEFAULTS = {  # each rewrite with only its size given: every other choice is the spec's default (benchmarks/README.md)
    "prune heads+FFN 25% (defaults)": {"passes": [{"kind": "prune", "granularity": "head", "amount": 0.25},
                                                   {"kind": "prune", "granularity": "neuron", "amount": 0.25}]},
    "prune heads+FFN 50% (defaults)": {"passes": [{"kind": "prune", "granularity": "head", "amount": 0.5},
                                                   {"kind": "prune", "granularity": "neuron", "amount": 0.5}]},
    "W4 weights (default method)": {"passes": [{"kind": "quantize", "weights": {"bits": 4}}]},
    "skip 2 blocks (defaults)": {"passes": [{"kind": "skip", "layers": 2}]},
    "tokens keep 0.5 after layer 1 (defaults)": {"passes": [{"kind": "token", "keep": 0.5, "after": [1]}]},
}


AT_HALF_LATENCY = {  # each single technique at the setting that brings latency near 0.5: the budget row's competitors
    "skip 3 blocks (beam fidelity)": {"passes": [{"kind": "skip", "layers": 3, "search": "beam", "importance": "fidelity_drop"}]},
    "prune heads+FFN 50%": {"passes": [{"kind": "prune", "granularity": "head", "amount": 0.5, "compensate": "lstsq"},
                                        {"kind": "prune", "granularity": "neuron", "amount": 0.5, "compensate": "lstsq"}]},
    "tokens keep 0.3 after layer 1": {"passes": [{"kind": "token", "keep": 0.3, "after": [1], "importance": "norm"}]},
    "W8A8 dynamic": {"passes": [{"kind": "quantize", "weights": None, "activations": {"mode": "dynamic"}, "embeddings": 8}]},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=None, help="limit STS-B dev pairs (default: all 1500)")
    ap.add_argument("--rows", default="all", help="comma-separated subset: single,defaults,peers,deploy,budget")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--pad", default="64", help="calibration padded to this many tokens (the default calibration, as a "
                    "DataLoader with padding='max_length' gives) or 'longest'")
    ap.add_argument("--lock", default="", help="file to flock around the throughput measurement (a shared machine's "
                    "timing lock), so that only one timing run happens at a time")
    ap.add_argument("--throughput", default="", help="comma-separated ONNX files (e.g. benchmarks/robustness.py --export): "
                    "only their throughput against the fp32 export, measured interleaved under --lock")
    args = ap.parse_args()
    if args.throughput:
        return throughput_only([Path(p) for p in args.throughput.split(",")], args.lock)
    want = {"single", "peers", "deploy", "budget"} if args.rows == "all" else set(args.rows.split(","))

    torch.manual_seed(0)
    model, tok = demo.load_minilm()
    calib = calibration(tok, args.samples, args.pad)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        base = compile_row("fp32 (uncompressed)", {"passes": [{"kind": "cleanup"}]}, model, tok, calib, out, args.pairs)
        base.kind = "reference"
        rows.append(base)
        print(f"fp32: {base.spearman:.2f}", flush=True)
        if "single" in want:
            rows += compile_rows(SINGLE, model, tok, calib, out, args.pairs)
            for r in rows:
                if "ShortGPT" in r.name:
                    r.kind = "peer"
        if "defaults" in want:
            rows += compile_rows(DEFAULTS, model, tok, calib, out, args.pairs)
        if "peers" in want:
            rows += peer_rows(base.onnx_path, out, tok, args.pairs)
        if "deploy" in want:
            spec = rewrite.Spec.from_yaml(ROOT / "specs" / "minilm-deploy.yaml").model_dump()
            rows.append(compile_row("deploy spec (specs/minilm-deploy.yaml)", spec, model, tok, calib, out, args.pairs))
        if "budget" in want:
            rows += compile_rows(AT_HALF_LATENCY, model, tok, calib, out, args.pairs)
            rows.append(compile_row("budget: latency 0.5", {"passes": [{"kind": "cleanup"}], "budget": {"latency": 0.5}},
                                    model, tok, calib, out, args.pairs))
        ids = torch.randint(1000, 20000, (BATCH, SEQ))
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((BATCH, SEQ), dtype=np.int64)}
        with timing_lock(args.lock):
            lat = throughput_table({r.name: r.onnx_path for r in rows if r.onnx_path is not None}, feeds)
    table = render(rows, lat, base)
    print(table)
    if args.readme:
        write_readme(table, args)


def throughput_only(paths: list[Path], lock: str) -> None:
    """Throughput of ready ONNX files against the fp32 export of all-MiniLM-L6-v2, side by side in one run."""
    model, tok = demo.load_minilm()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        rewrite.compile(copy.deepcopy(model), {"passes": [{"kind": "cleanup"}]},
                        example_inputs=demo.example_inputs(tok)).export(fp32)
        ids = torch.randint(1000, 20000, (BATCH, SEQ))
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((BATCH, SEQ), dtype=np.int64)}
        files = {"fp32": fp32, **{p.name: p for p in paths}}
        with timing_lock(lock):
            lat = throughput_table(files, feeds)
        print(f"| model | ONNX MB | throughput (seq/s, batch {BATCH} x {SEQ}) | speedup |\n|---|---:|---:|---:|")
        for name, path in files.items():
            print(f"| {name} | {path.stat().st_size / 1e6:.2f} | {BATCH / lat[name]:.0f} | {lat['fp32'] / lat[name]:.2f}x |")


def render(rows: list[Row], lat: dict[str, float], base: Row) -> str:
    b = lat[base.name]
    lines = ["| model | by | STS-B Spearman | drop | ONNX MB | throughput (seq/s) | speedup |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = lat.get(r.name)
        lines.append(f"| {r.name} | {r.kind} | {r.spearman:.2f} | {base.spearman - r.spearman:+.2f} | {r.mb:.1f} | "
                     f"{BATCH / t:.0f} | {b / t:.2f}x |" if t else f"| {r.name} | {r.kind} | {r.spearman:.2f} | "
                     f"{base.spearman - r.spearman:+.2f} | {r.mb:.1f} | n/a | n/a |")
    return "\n".join(lines)


def write_readme(table: str, args: argparse.Namespace) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = "<!-- RESULTS:START -->", "<!-- RESULTS:END -->"
    cmd = ("python benchmarks/deploy.py --readme" + (f" --rows {args.rows}" if args.rows != "all" else "")
           + (f" --pairs {args.pairs}" if args.pairs else "") + (f" --samples {args.samples}" if args.samples != 128 else "")
           + (f" --pad {args.pad}" if args.pad != "64" else ""))
    block = (f"{start}\nall-MiniLM-L6-v2, STS-B dev Spearman, exported ONNX size, onnxruntime CPU throughput at "
             f"batch {BATCH} x {SEQ} tokens (2 cores), measured side by side in one run; calibration: the spec default "
             f"{args.samples} STS-B train sentences (outside the selection split), padded to "
             f"{args.pad if args.pad == 'longest' else args.pad + ' tokens'}. Every default and the deploy spec were chosen on "
             f"the selection split (held-out STS-B train pairs), never on dev: benchmarks/README.md. "
             f"Regenerate with `{cmd}`.\n\n{table}\n{end}")
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n## Results\n\n" + block + "\n"
    readme.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
