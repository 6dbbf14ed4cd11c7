"""The `rewrite` command line: compile, inspect, schema.

    rewrite compile [SPEC] [--model MODULE:FACTORY|hf:DIR] [--calibration FILE] [--out DIR] [--backend onnx|tvm]
    rewrite inspect [SPEC] [--importance KIND] [--model MODULE:FACTORY] [--out DIR]
    rewrite search SPEC --grid KEY=V1,V2 [--executor local|ray]
    rewrite schema
    rewrite --version

`--model MODULE:FACTORY` names a function returning `(model, example_inputs)`,
`(model, example_inputs, calibration)` or `(model, example_inputs, calibration, tokenizer)`;
`--model hf:DIR` loads a Hugging Face checkpoint folder (config.json + safetensors, its tokenizer
if it has one; calibration from `--calibration FILE`). Without it, the built-in all-MiniLM-L6-v2 with STS-B calibration sentences is used. Every
error prints one line on stderr (`-v` adds the traceback); progress goes to stderr unless `-q`.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator

from .errors import RewriteError
from .model_refs import default_model as _default_model, load_factory as _load_factory
from .output_files import OutputFolder, check_writable

# The example specs live in the repo's specs/ folder (an editable install finds them).
SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"
DEFAULT_SPEC = SPECS_DIR / "minilm-deploy.yaml"
"""`rewrite compile` with no spec: every rewrite composed for the default model (all-MiniLM-L6-v2)."""
MODEL_DEFAULT_SPEC = SPECS_DIR / "cleanup.yaml"
"""With --model and no spec: capture, clean up and export (the deploy spec is tuned for MiniLM)."""


def _calibration_from_file(args: argparse.Namespace, spec: Any, example: Any, tokenizer: Any) -> list[Any]:
    from .calibration_files import load_calibration_file
    from .inputs import Inputs

    return load_calibration_file(args.calibration, Inputs.of(example), tokenizer=tokenizer, samples=spec.calibration.samples,
                                 batch_size=spec.calibration.batch_size)


def _status(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def cmd_compile(args: argparse.Namespace) -> int:
    from .compiler import compile as rewrite_compile
    from .progress import showing, stage
    from .spec import Spec

    default = MODEL_DEFAULT_SPEC if args.model else DEFAULT_SPEC
    spec_path = args.spec or (default if default.exists() else None)
    spec = Spec.load(spec_path)
    out_dir = Path(args.out)
    check_writable(out_dir)
    if not args.spec and spec_path is not None:
        _status(args, f"no spec given: using {spec_path.name}")
    if args.model and args.model.startswith("hf:") and not args.in_memory:
        qspec = _block_local_quantize(spec, args.backend)
        if qspec is not None:
            return _compile_sequential(args, spec, qspec, out_dir)
    with showing(not args.quiet), OutputFolder(out_dir).transaction() as out:
        tokenizer = None
        start = time.perf_counter()
        with stage("load the model"):
            if args.model:
                model, example, calib, tokenizer = _load_factory(args.model)
            else:
                model, example, calib, tokenizer = _default_model(spec.calibration.samples, spec.calibration.batch_size, spec.calibration.seed)
        if args.calibration:
            calib = _calibration_from_file(args, spec, example, tokenizer)
        _status(args, f"compiling {type(model).__name__} with {len(spec.passes)} pass(es): {', '.join(p.kind for p in spec.passes)}")
        compiled = rewrite_compile(model, spec, example_inputs=example, calibration=calib)
        if args.backend in ("onnx", "all"):
            rec = compiled.export(out.file("model.onnx"), verify_inputs=compiled.verification_batches())
            _status(args, f"wrote {rec.path} ({rec.bytes / 1e6:.2f} MB). {rec.verdict()}")
            _save_generation_tokenizer(args, compiled, out_dir, tokenizer)
            if not args.no_latency and not compiled.program.notes.get("generation"):
                lat = compiled.measure_latency()
                _status(args, lat.verdict(compiled.report.after.flops / max(compiled.report.before.flops, 1)))
        if args.backend in ("tvm", "all"):
            with stage(f"build with TVM ({args.target}) and verify"):
                built = compiled.build("tvm", target=args.target, verify=True, verify_inputs=compiled.verification_batches())
            if hasattr(built, "save"):
                built.save(out.file("model.tvm.so"))
                _status(args, f"wrote {out_dir / 'model.tvm.so'} (TVM {args.target}); {getattr(built, 'verify_note', '')}")
            else:  # e.g. CUDA without a CUDA-enabled TVM: torch module + kernels compiled at first use
                _status(args, f"built for TVM {args.target}, no library written ({type(built).__name__} has no "
                              f"saved form); {getattr(built, 'verify_note', '')}")
            if args.emit_source and hasattr(built, "source"):
                src_name = "kernels.cu" if "cuda" in str(args.target) else "kernels.ll"  # CUDA C, else LLVM IR
                out.write_text(src_name, built.source())
        if tokenizer is not None and not args.no_eval and not args.model:
            _evaluate_stsb(compiled, tokenizer, args)
        out.write_text("report.md", compiled.report.to_markdown())
        out.write_text("report.json", compiled.report.to_json())
    print(compiled.report.to_table())
    _status(args, f"done in {time.perf_counter() - start:.1f}s; report: {out_dir / 'report.md'}")
    return 0


def _block_local_quantize(spec: Any, backend: str) -> Any:
    """The spec's quantize pass when the whole spec can run block by block (`rewrite.sequential`): one
    quantize pass the pipeline supports (cleanup passes aside), no budget, ONNX output; else None."""
    from rewrite.passes.quantize import QuantizeSpec

    from .sequential import unsupported_features

    if backend != "onnx" or getattr(spec, "budget", None) is not None:
        return None
    quantize = [p for p in spec.passes if p.kind == "quantize"]
    if len(quantize) != 1 or any(p.kind not in ("quantize", "cleanup") for p in spec.passes):
        return None
    q = quantize[0]
    return q if isinstance(q, QuantizeSpec) and not unsupported_features(q) else None


def _compile_sequential(args: argparse.Namespace, spec: Any, qspec: Any, out_dir: Path) -> int:
    """`compile SPEC --model hf:DIR` for a block-local quantize spec: the checkpoint is quantized one
    block at a time into OUT/checkpoint, then exported to OUT/model.onnx (+ .data) in bounded memory
    and checked in onnxruntime; the whole model is never in memory."""
    from rewrite.sequential_export import export_checkpoint

    from .checkpoint import load_hf
    from .model_refs import folder_example, tokenizer_of
    from .progress import showing
    from .sequential import quantize_sequential

    directory = args.model[3:]
    with showing(not args.quiet), OutputFolder(out_dir).transaction() as out:
        start = time.perf_counter()
        ckpt = load_hf(directory)
        _status(args, f"{type(ckpt.model).__name__} from {directory}: quantizing block by block "
                      f"({qspec.method}, {qspec.weights.bits} bits; the whole model is never loaded; "
                      "--in-memory compiles it whole instead)")
        calib = None
        if args.calibration and qspec.method != "rtn":
            tokenizer = tokenizer_of(Path(directory))
            example = folder_example(directory, ckpt.config, tokenizer, type(ckpt.model).__name__)
            calib = _calibration_from_file(args, spec, example, tokenizer)
        folder = out.file("checkpoint")
        try:
            result = quantize_sequential(ckpt, qspec, folder, calibration=calib)
            rec = export_checkpoint(folder, out.file("model.onnx"), opset=spec.export.onnx.opset, tokens=8,
                                    options=spec.export.onnx)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)   # the transaction removes files, not this folder
            raise
        _status(args, f"wrote {rec.path} + {rec.data_path.name} ({rec.bytes / 1e6:.1f} MB); onnxruntime matches the "
                      f"torch model on {rec.tokens} tokens (relative error {rec.rel_error:.1e})")
        report = ("# rewrite compile (block by block)\n\n"
                  f"{qspec.method} W{qspec.weights.bits} g{qspec.weights.group_size} of {directory}\n\n"
                  f"## quantize (peak RSS {result.peak_rss_mb:.0f} MB)\n\n{result.table()}\n\n"
                  f"## ONNX export (peak RSS {rec.peak_rss_mb:.0f} MB; relative error in onnxruntime "
                  f"{rec.rel_error:.1e})\n\n{rec.table()}\n")
        out.write_text("report.md", report)
        out.write_text("report.json", json.dumps({
            "quantize": {"phases": [p.__dict__ for p in result.phases], "notes": result.notes},
            "onnx": {"path": str(rec.path), "bytes": rec.bytes, "rel_error": rec.rel_error, "cosine": rec.cosine,
                     "phases": [p.__dict__ for p in rec.phases]}}, indent=1))
    print(report)
    _status(args, f"done in {time.perf_counter() - start:.1f}s; report: {out_dir / 'report.md'}")
    return 0


def _evaluate_stsb(compiled: Any, tokenizer: Any, args: argparse.Namespace) -> None:
    """STS-B dev Spearman of the built-in model before and after, into the report's main table.

    The rewritten model is scored as exported, in onnxruntime, when an ONNX file was written:
    that is the model being deployed, and its integer kernels run there at full speed while
    the torch graph runs reference implementations of them (minutes instead of seconds).
    """
    from . import demo
    from .progress import stage

    if demo.stsb_dir() is None:
        _status(args, "STS-B data not found (../shared/data/stsb or $REWRITE_STSB): the accuracy check is skipped")
        return
    with stage("STS-B dev: scoring the original model (torch)"):
        before = demo.sts_score(compiled.original.module, tokenizer, limit=args.eval_pairs)
    exported = next((Path(e.path) for e in reversed(compiled.report.exports) if e.backend == "onnx" and Path(e.path).exists()), None)
    rewritten, runtime = compiled.module, "torch"
    if exported is not None:
        from rewrite.backends.onnx import OnnxModule

        rewritten, runtime = OnnxModule(exported, compiled.program), "onnxruntime"
    with stage(f"STS-B dev: scoring the rewritten model ({runtime})"):
        after = demo.sts_score(rewritten, tokenizer, limit=args.eval_pairs)
    pairs = f"{args.eval_pairs} pairs of " if args.eval_pairs else ""
    compiled.report.add_task_metric("STS-B dev Spearman x100", before, after, key="stsb_dev_spearman",
                                    note=f"on {pairs}STS-B dev; the original scored in torch, the rewritten in {runtime}")


def cmd_schema(args: argparse.Namespace) -> int:
    from .spec import Spec

    print(json.dumps(Spec.model_json_schema(), indent=2))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .search import run_search

    return run_search(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .cli_inspect import run_inspect

    return run_inspect(args)


# ------------------------------------------------------------------ generate (text generation)
def _tokenizer_from_factory(ref: str) -> Any:
    """The tokenizer that goes with `--model MODULE:FACTORY`: MODULE.FACTORY_tokenizer(),
    MODULE.tokenizer(), or the second item of MODULE.load_FACTORY() (model, tokenizer)."""
    if ref.startswith("hf:"):  # a checkpoint folder: its own tokenizer, if it has one
        from .model_refs import tokenizer_of

        return tokenizer_of(Path(ref[3:]))
    mod_name, _, fn_name = ref.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise RewriteError(f"cannot import {mod_name!r} for --model: {exc}") from None
    for name in (f"{fn_name}_tokenizer", "tokenizer"):
        if callable(getattr(module, name, None)):
            return getattr(module, name)()
    loader = getattr(module, f"load_{fn_name}", None)
    if callable(loader):
        got = loader()
        if isinstance(got, tuple) and len(got) == 2:
            return got[1]
    return None


def _save_generation_tokenizer(args: argparse.Namespace, compiled: Any, out_dir: Path, tokenizer: Any = None) -> None:
    """Save the --model's tokenizer beside a generation graph, so `rewrite generate --onnx` needs nothing else."""
    if not args.model or not compiled.program.notes.get("generation"):
        return
    tok = tokenizer if tokenizer is not None else _tokenizer_from_factory(args.model)
    if tok is not None:
        tok.save_pretrained(str(out_dir))
        print(f"saved the tokenizer beside {out_dir / 'model.onnx'}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .decoding import generate

    onnx_path = Path(args.onnx)
    if not onnx_path.exists():
        raise RewriteError(f"no ONNX file at {onnx_path}: run `rewrite compile ... --out {onnx_path.parent}` first")
    tok = None
    if args.tokenizer:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    elif args.model:
        tok = _tokenizer_from_factory(args.model)
        if tok is None:
            raise RewriteError(f"{args.model} has no tokenizer: give --tokenizer DIR")
    elif any((onnx_path.parent / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(str(onnx_path.parent))
    else:
        raise RewriteError(f"no tokenizer beside {onnx_path}: give --model MODULE:FACTORY or --tokenizer DIR")
    for piece in generate(str(onnx_path), tok, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                          top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, seed=args.seed, stream=True):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _add_generate_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    g = sub.add_parser("generate", parents=[common], help="generate text with an exported text-generation ONNX model (KV cache)")
    g.add_argument("prompt")
    g.add_argument("--onnx", default="out/model.onnx", help="an exported generation graph (default: out/model.onnx)")
    g.add_argument("--model", help="MODULE:FACTORY whose module provides the tokenizer (default: the one saved beside --onnx)")
    g.add_argument("--tokenizer", help="a saved Hugging Face tokenizer directory")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--sample", action="store_true", help="sample (top-k / top-p) instead of greedy decoding")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)


def _output_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    """-v / -q, accepted before and after the subcommand (SUPPRESS there, so a subcommand
    without them does not reset what was given before it)."""
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log each pass; print the traceback of an error")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress or status lines (errors and the report still print)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rewrite", description="A declarative graph-rewrite compiler for PyTorch models.")
    p.add_argument("--version", action="version", version=f"rewrite {_version()}")
    _output_flags(p, False)
    sub = p.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)
    _output_flags(common, argparse.SUPPRESS)  # also after the subcommand (`rewrite compile -q`)

    c = sub.add_parser("compile", parents=[common], help="compile a model with a spec and export it")
    c.add_argument("spec", nargs="?", help="spec file (YAML or JSON); default: specs/minilm-deploy.yaml for the built-in model, "
                   "specs/cleanup.yaml with --model")
    c.add_argument("--model", help="MODULE:FACTORY returning (model, example_inputs[, calibration]), or hf:DIR "
                   "(a Hugging Face checkpoint folder: config.json + safetensors); default: all-MiniLM-L6-v2")
    c.add_argument("--calibration", metavar="FILE", help="calibration data: .txt or .jsonl text (one sample a line; needs "
                   "a tokenizer) or .pt (torch.save of a list of batches shaped like the example inputs)")
    c.add_argument("--out", default="out", help="output folder (default: out); checked for writing before any work")
    c.add_argument("--backend", choices=["onnx", "tvm", "all"], default="onnx")
    c.add_argument("--target", default="llvm", help="TVM target for --backend tvm (llvm, cuda)")
    c.add_argument("--emit-source", action="store_true", help="write generated kernel source (TVM)")
    c.add_argument("--no-eval", action="store_true", help="skip the STS-B accuracy check of the built-in model")
    c.add_argument("--eval-pairs", type=int, default=None, help="limit STS-B pairs for the accuracy check")
    c.add_argument("--no-latency", action="store_true", help="skip measuring onnxruntime latency before and after")
    c.add_argument("--in-memory", action="store_true", help="with hf:DIR: compile the whole model in memory even when "
                   "the spec could run block by block (a quantize pass with method rtn/gptq and uniform bits)")
    c.set_defaults(func=cmd_compile)

    i = sub.add_parser("inspect", parents=[common], help="importance tables and plots, without rewriting")
    i.add_argument("spec", nargs="?", help="spec whose importance kinds to show")
    i.add_argument("--importance", action="append", help="importance kind to compute (repeatable)")
    i.add_argument("--model", help="MODULE:FACTORY or hf:DIR; default: all-MiniLM-L6-v2")
    i.add_argument("--out", default="out/inspect")
    i.add_argument("--groups", action="store_true", help="print the coupled dimension groups")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("search", parents=[common], help="sweep spec parameters; print the Pareto front; write the best spec")
    r.add_argument("spec", help="the base spec (YAML or JSON)")
    r.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                   help="a spec field by its path and the values to try, e.g. passes.0.amount=0.1,0.25 (repeatable)")
    r.add_argument("--model", help="MODULE:FACTORY or hf:DIR; default: all-MiniLM-L6-v2")
    r.add_argument("--executor", choices=["local", "ray"], default="local", help="where combinations run (ray: Ray workers)")
    r.add_argument("--max-drop", type=float, default=0.01, help="largest cosine drop the best spec may have (default 0.01)")
    r.add_argument("--out", default="out/search", help="folder for search.md and best.yaml")
    r.set_defaults(func=cmd_search)

    s = sub.add_parser("schema", help="print the spec's JSON schema")
    s.set_defaults(func=cmd_schema)
    _add_generate_parser(sub, common)
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("rewrite")
    except Exception:  # noqa: BLE001 - not installed (run from a checkout)
        from . import __version__

        return __version__


def one_line(exc: BaseException) -> str:
    """`error: ...` on one line: the compiler's own errors as they are, others with their type."""
    text = " ".join(str(exc).split())
    if isinstance(exc, RewriteError):
        return f"error: {text}"
    return f"error: {type(exc).__name__}: {text or 'no message'} (run with -v for the traceback)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    with _logging_to_stderr(args), warnings.catch_warnings():
        if not args.verbose:  # deprecation notices from torch/transformers internals are not the user's to act on
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
        return _run(args)


@contextlib.contextmanager
def _logging_to_stderr(args: argparse.Namespace) -> Iterator[None]:
    """The compiler's log on stderr for this command (INFO with -v, nothing below ERROR with -q)."""
    logger = logging.getLogger("rewrite")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    old_level = logger.level
    logger.setLevel(logging.INFO if args.verbose else (logging.ERROR if args.quiet else logging.WARNING))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error is one line; -v shows where it came from
        if args.verbose:
            traceback.print_exc()
        print(one_line(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
