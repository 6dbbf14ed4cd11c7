"""The `rewrite` command line: compile, inspect, schema, bench.

    rewrite compile [SPEC] [--model MODULE:FACTORY] [--out DIR] [--backend onnx|tvm]
    rewrite inspect [SPEC] [--importance KIND] [--model MODULE:FACTORY] [--out DIR]
    rewrite schema

`--model MODULE:FACTORY` names a function returning a model, `(model, example_inputs)` or
`(model, example_inputs, calibration)`. Without it, the built-in all-MiniLM-L6-v2 with
STS-B calibration sentences is used. Errors the user can fix print one message, no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from .errors import RewriteError

# The example specs live in the repo's specs/ folder (an editable install finds them).
SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"
DEFAULT_SPEC = SPECS_DIR / "minilm-deploy.yaml"
"""`rewrite compile` with no spec: every rewrite composed for the default model (all-MiniLM-L6-v2)."""
MODEL_DEFAULT_SPEC = SPECS_DIR / "cleanup.yaml"
"""With --model and no spec: capture, clean up and export (the deploy spec is tuned for MiniLM)."""


def _load_factory(ref: str) -> tuple[Any, Any, Any]:
    if ":" not in ref:
        raise RewriteError(f"--model must look like MODULE:FACTORY (e.g. mypkg.models:build), got {ref!r}")
    mod_name, fn_name = ref.split(":", 1)
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise RewriteError(f"cannot import {mod_name!r} for --model: {exc}") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise RewriteError(f"{mod_name!r} has no attribute {fn_name!r} (from --model {ref})")
    got = fn()
    if isinstance(got, tuple):
        if len(got) == 2:
            return got[0], got[1], None
        if len(got) == 3:
            return got
        raise RewriteError(f"{ref} returned a tuple of {len(got)}; expected model, (model, inputs) or (model, inputs, calibration)")
    raise RewriteError(f"{ref} returned only a model: return (model, example_inputs[, calibration]) so it can be captured")


def _default_model(samples: int, batch_size: int, seed: int) -> tuple[Any, Any, Any, Any]:
    from . import demo

    model, tok = demo.load_minilm()
    calib = demo.calibration_batches(tok, samples=samples, batch_size=batch_size, seed=seed)
    return model, demo.example_inputs(tok), calib, tok


def cmd_compile(args: argparse.Namespace) -> int:
    from .compiler import compile as rewrite_compile
    from .spec import Spec

    default = MODEL_DEFAULT_SPEC if args.model else DEFAULT_SPEC
    spec_path = args.spec or (default if default.exists() else None)
    spec = Spec.load(spec_path)
    if not args.spec and spec_path is not None:
        print(f"no spec given: using {spec_path.name}", file=sys.stderr)
    out_dir = Path(args.out)
    tokenizer = None
    if args.model:
        model, example, calib = _load_factory(args.model)
    else:
        model, example, calib, tokenizer = _default_model(spec.calibration.samples, spec.calibration.batch_size, spec.calibration.seed)
    print(f"compiling {type(model).__name__} with {len(spec.passes)} pass(es): {', '.join(p.kind for p in spec.passes)}", file=sys.stderr)
    start = time.perf_counter()
    compiled = rewrite_compile(model, spec, example_inputs=example, calibration=calib, progress=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.backend in ("onnx", "all"):
        rec = compiled.export(out_dir / "model.onnx", verify_inputs=compiled.verification_batches())
        print(f"wrote {rec.path} ({rec.bytes / 1e6:.2f} MB), onnxruntime max abs error {rec.max_abs_error:.2e}", file=sys.stderr)
        _save_generation_tokenizer(args, compiled, out_dir)
    if args.backend in ("tvm", "all"):
        built = compiled.build("tvm", target=args.target, verify=True, verify_inputs=compiled.verification_batches())
        if hasattr(built, "save"):
            built.save(out_dir / "model.tvm.so")
        print(f"wrote {out_dir / 'model.tvm.so'} (TVM {args.target}); {getattr(built, 'verify_note', '')}", file=sys.stderr)
        if args.emit_source and hasattr(built, "source"):
            src_name = "kernels.cu" if "cuda" in str(args.target) else "kernels.ll"  # CUDA C, else LLVM IR
            (out_dir / src_name).write_text(built.source())
    if tokenizer is not None and not args.no_eval:
        from . import demo

        if demo.stsb_dir() is not None:
            score_before = demo.sts_score(compiled.original.module, tokenizer, limit=args.eval_pairs)
            score_after = demo.sts_score(compiled.module, tokenizer, limit=args.eval_pairs)
            compiled.report.metrics["stsb_dev_spearman_original"] = round(score_before, 3)
            compiled.report.metrics["stsb_dev_spearman_rewritten"] = round(score_after, 3)
    (out_dir / "report.md").write_text(compiled.report.to_markdown(), encoding="utf-8")
    (out_dir / "report.json").write_text(compiled.report.to_json(), encoding="utf-8")
    print(compiled.report.to_table())
    print(f"done in {time.perf_counter() - start:.1f}s; report: {out_dir / 'report.md'}", file=sys.stderr)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .spec import Spec

    print(json.dumps(Spec.model_json_schema(), indent=2))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        from passes.importance.inspect import run_inspect
    except ImportError:
        raise RewriteError("rewrite inspect is not available in this build (passes.importance.inspect missing)") from None
    return run_inspect(args)


# ------------------------------------------------------------------ generate (text generation)
def _tokenizer_from_factory(ref: str) -> Any:
    """The tokenizer that goes with `--model MODULE:FACTORY`: MODULE.FACTORY_tokenizer(),
    MODULE.tokenizer(), or the second item of MODULE.load_FACTORY() (model, tokenizer)."""
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


def _save_generation_tokenizer(args: argparse.Namespace, compiled: Any, out_dir: Path) -> None:
    """Save the --model's tokenizer beside a generation graph, so `rewrite generate --onnx` needs nothing else."""
    if not args.model or not compiled.program.notes.get("generation"):
        return
    tok = _tokenizer_from_factory(args.model)
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


def _add_generate_parser(sub: Any) -> None:
    g = sub.add_parser("generate", help="generate text with an exported text-generation ONNX model (KV cache)")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rewrite", description="A declarative graph-rewrite compiler for PyTorch models.")
    p.add_argument("-v", "--verbose", action="store_true", help="log each pass")
    sub = p.add_subparsers(dest="command")

    c = sub.add_parser("compile", help="compile a model with a spec and export it")
    c.add_argument("spec", nargs="?", help="spec file (YAML or JSON); default: specs/minilm-deploy.yaml for the built-in model, "
                   "specs/cleanup.yaml with --model")
    c.add_argument("--model", help="MODULE:FACTORY returning (model, example_inputs[, calibration]); default: all-MiniLM-L6-v2")
    c.add_argument("--out", default="out", help="output folder (default: out)")
    c.add_argument("--backend", choices=["onnx", "tvm", "all"], default="onnx")
    c.add_argument("--target", default="llvm", help="TVM target for --backend tvm (llvm, cuda)")
    c.add_argument("--emit-source", action="store_true", help="write generated kernel source (TVM)")
    c.add_argument("--no-eval", action="store_true", help="skip the STS-B accuracy check of the built-in model")
    c.add_argument("--eval-pairs", type=int, default=None, help="limit STS-B pairs for the accuracy check")
    c.set_defaults(func=cmd_compile)

    i = sub.add_parser("inspect", help="importance tables and plots, without rewriting")
    i.add_argument("spec", nargs="?", help="spec whose importance kinds to show")
    i.add_argument("--importance", action="append", help="importance kind to compute (repeatable)")
    i.add_argument("--model", help="MODULE:FACTORY; default: all-MiniLM-L6-v2")
    i.add_argument("--out", default="out/inspect")
    i.add_argument("--groups", action="store_true", help="print the coupled dimension groups")
    i.set_defaults(func=cmd_inspect)

    s = sub.add_parser("schema", help="print the spec's JSON schema")
    s.set_defaults(func=cmd_schema)
    _add_generate_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RewriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
