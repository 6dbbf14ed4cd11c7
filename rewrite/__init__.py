"""rewrite: a declarative graph-rewrite compiler for PyTorch models.

    import rewrite
    out = rewrite.compile(model, "spec.yaml", example_inputs=(ids, mask), calibration=batches)
    out.module          # rewritten torch.fx.GraphModule, called like the original
    out.report          # what each pass did and what it cost
    out.export("model.onnx")   # ONNX, verified in onnxruntime
"""
from .checkpoint import load_hf
from .compiler import Compiled, compile
from .decoding import GenerationError, generate
from .errors import (
    CalibrationError,
    CaptureError,
    ExportError,
    PassError,
    RewriteError,
    SpecError,
    VerificationError,
)
from .inputs import Inputs
from .program import Block, Program
from .report import Report
from .spec import Spec

__all__ = [
    "compile", "Compiled", "load_hf", "generate", "GenerationError", "Spec", "Program", "Block", "Inputs", "Report",
    "RewriteError", "SpecError", "CaptureError", "CalibrationError", "PassError", "ExportError", "VerificationError",
]
__version__ = "0.1.0"

import logging as _logging

# a library prints nothing unless the application configures logging (the CLI does)
_logging.getLogger("rewrite").addHandler(_logging.NullHandler())
