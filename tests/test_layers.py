"""The house plan, checked: no import cycles, and no arrow points up a layer.

Layers, bottom to top (the README, "How it works"):
- core: the IR and what every layer shares (`rewrite.program`, `capture`, `dims`, `spec`,
  `inputs`, `statistics`, `measure`, `report`, `pass_base`, ...);
- kernels: custom ops (reference, fake, ONNX lowering, TVM kernel); imports the core only;
- passes and backends: each imports the core and kernels, never the other;
- driver: `compiler`, `passmanager`, `allocate` (runs passes, calls backends);
- tools: the CLI, `inspect`, generation runtime, model zoo, demo data and model loaders.
Imports inside functions count too: a lazy import is still an arrow.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
LAYER_PACKAGES = ("passes", "backends", "kernels")  # rewrite.<name>: a layer of its own
DRIVER = {"rewrite.compiler", "rewrite.passmanager", "rewrite.allocate", "rewrite.executor", "rewrite.sequential",
          "rewrite.sequential_export"}
TOOLS = {"rewrite", "rewrite.cli", "rewrite.cli_inspect", "rewrite.model_refs", "rewrite.decoding", "rewrite.demo",
         "rewrite.zoo", "rewrite.zoo_hf", "rewrite.zoo_factories", "rewrite.zoo_grid", "rewrite.models",
         "rewrite.llm_data", "rewrite.search"}
MAY_IMPORT = {
    "core": {"core"},
    "kernels": {"core", "kernels"},
    "passes": {"core", "kernels", "passes"},
    "backends": {"core", "kernels", "backends"},
    "driver": {"core", "kernels", "passes", "backends", "driver"},
    "tools": {"core", "kernels", "passes", "backends", "driver", "tools"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "rewrite").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imported(module: str, path: Path, tree: ast.AST, known: dict[str, Path]) -> set[str]:
    """Modules of this repository that `module` imports (at any depth of its code)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            subs = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in known]
            names = subs if len(subs) == len(node.names) else [name, *subs]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> nx.DiGraph:
    known = _modules()
    graph = nx.DiGraph()
    for module, path in known.items():
        graph.add_node(module)
        for target in _imported(module, path, ast.parse(path.read_text(encoding="utf-8")), known):
            graph.add_edge(module, target)
    return graph


def layer(module: str) -> str:
    if module in TOOLS:
        return "tools"
    if module in DRIVER:
        return "driver"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYER_PACKAGES else "core"


def test_no_import_cycles() -> None:
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_no_upward_imports() -> None:
    upward = [f"{a} ({layer(a)}) -> {b} ({layer(b)})" for a, b in import_graph().edges
              if layer(b) not in MAY_IMPORT[layer(a)]]
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_layers_cover_every_module() -> None:
    assert set(map(layer, import_graph().nodes)) <= set(MAY_IMPORT)
