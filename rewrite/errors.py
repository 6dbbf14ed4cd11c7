"""Errors that reach the user. Each one names the problem and the fix in one message.

The CLI prints `str(error)` for these and exits non-zero, without a traceback.
"""
from __future__ import annotations


class RewriteError(Exception):
    """Base of every error rewrite raises on purpose."""


class SpecError(RewriteError, ValueError):
    """The spec is invalid: the message names the field path, the bad value and what is valid."""


class CaptureError(RewriteError):
    """torch.export could not capture the model: the message names the module and source line."""


class CalibrationError(RewriteError):
    """Calibration data is missing or does not match the example inputs."""


class PassError(RewriteError):
    """A pass cannot apply to this model (or this order of passes cannot work)."""


class ExportError(RewriteError):
    """Lowering to a backend (ONNX, TVM) failed."""


class VerificationError(RewriteError):
    """A backend's output does not match the rewritten torch module within tolerance."""
