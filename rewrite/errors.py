"""Errors that reach the user. Each one names the problem and the fix in one message.

The CLI prints `error: <message>` on one line for these and exits non-zero; `-v` adds the traceback.
"""
from __future__ import annotations


class RewriteError(Exception):
    """Base of every error rewrite raises on purpose."""


class SpecError(RewriteError, ValueError):
    """The spec is invalid: the message names the field path, the bad value and what is valid."""


class CaptureError(RewriteError):
    """torch.export could not capture the model: the message gives torch's cause, the module and
    source line that raised it, and a fix, on one line."""


class CalibrationError(RewriteError):
    """Calibration data is missing or does not match the example inputs."""


class PassError(RewriteError):
    """A pass cannot apply to this model (or this order of passes cannot work)."""


class ExportError(RewriteError):
    """Lowering to a backend (ONNX, TVM) failed: the message gives the exporter's cause (every
    exception in its chain, not only the wrapper's first line), the graph node and the model's
    source line that made it where known, and a fix."""


class VerificationError(RewriteError):
    """A backend's output does not match the rewritten torch module within tolerance."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors.

    >>> first_line(ValueError("bad config")), first_line(KeyError())
    ('bad config', 'KeyError')
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
