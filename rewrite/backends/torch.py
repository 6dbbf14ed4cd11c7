"""The torch backend: the rewritten GraphModule itself, saved with torch.export."""
from __future__ import annotations

from pathlib import Path

import torch

from rewrite.capture import export_program
from rewrite.program import Program


def save(program: Program, path: str | Path) -> Path:
    """Save the rewritten program as a torch.export archive (.pt2) loadable with torch.export.load."""
    path = Path(path)
    ep = export_program(program.module, program.example, program.dynamic)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.export.save(ep, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
