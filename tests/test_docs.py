"""The runnable examples in the main entry points' docstrings (compile, Compiled.export,
Spec, Program, the pass base class, model references) run and print what they say."""
from __future__ import annotations

import doctest
import importlib

import pytest

DOCUMENTED = ["rewrite.compiler", "rewrite.program", "rewrite.spec", "rewrite.pass_base", "rewrite.model_refs", "rewrite.compare",
              "rewrite.executor", "rewrite.search", "rewrite.output_files", "rewrite.shapes",
              "rewrite.cache", "rewrite.rules"]


@pytest.mark.parametrize("module_name", DOCUMENTED)
def test_docstring_examples_run(module_name: str) -> None:
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{module_name} has no runnable example"
    assert result.failed == 0, f"{result.failed} docstring example(s) of {module_name} failed (run: python -m doctest -v)"


def test_public_api_has_docstrings() -> None:
    import rewrite
    from rewrite.pass_base import Pass

    import rewrite.spec as spec_module

    def undocumented(obj) -> bool:
        return not (getattr(obj, "__doc__", None) or "").strip()

    missing = [name for name in rewrite.__all__ if undocumented(getattr(rewrite, name))]
    classes = [getattr(rewrite, n) for n in rewrite.__all__ if isinstance(getattr(rewrite, n), type)] + [Pass]
    classes += [c for c in vars(spec_module).values() if isinstance(c, type) and c.__module__ == spec_module.__name__]
    for cls in classes:
        for attr, value in vars(cls).items():
            if attr.startswith("_") or not callable(getattr(value, "__func__", value)):
                continue
            if undocumented(getattr(value, "__func__", value)):
                missing.append(f"{cls.__name__}.{attr}")
    assert not missing, f"public names without a docstring: {missing}"
