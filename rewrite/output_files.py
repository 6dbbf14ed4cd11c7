"""The files a command writes: checked for writing before any work, written atomically,
all removed if the command fails or is interrupted (nothing half-written is left behind).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from rewrite.output_files import OutputFolder
    >>> root = Path(tempfile.mkdtemp())
    >>> with OutputFolder(root / "out").transaction() as out:
    ...     _ = out.write_text("report.md", "# report")
    >>> sorted(p.name for p in (root / "out").iterdir())
    ['report.md']
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import RewriteError


def check_writable(out_dir: Path) -> None:
    """Fail before any work when `--out` cannot be written (not after minutes of compiling).

    Probes by creating and removing a file in the folder, or in its nearest existing parent
    when the folder does not exist yet (nothing is left behind either way).
    """
    probe = out_dir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise RewriteError(f"cannot write to --out {out_dir}: {probe} is a file, not a folder; choose another --out")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise RewriteError(f"cannot write to --out {out_dir}: {exc.strerror or exc} ({probe}); choose another --out") from None


class OutputFolder:
    """The files one command (`rewrite compile`, `rewrite search`) writes: each written atomically, all removed if the run fails.

    An interrupted or failed run leaves neither a half-written file nor a model without its
    report; the folder itself is removed again when this run created it.
    """

    def __init__(self, path: Path):
        self.path = path
        self.created = not path.exists()
        self.written: list[Path] = []

    def file(self, name: str) -> Path:
        """The path of `name` in the folder (created), removed again if the run fails."""
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / name
        self.written.append(target)
        return target

    def write_text(self, name: str, text: str) -> Path:
        """Write `name` atomically (a temporary file renamed into place)."""
        target = self.file(name)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
        return target

    @contextlib.contextmanager
    def transaction(self) -> Iterator["OutputFolder"]:
        """Everything written inside is removed when the block raises (Ctrl-C included)."""
        try:
            yield self
        except BaseException:
            for f in self.written:
                for p in (f, f.with_name(f.name + ".data"), f.with_name(f".{f.name}.tmp")):
                    with contextlib.suppress(OSError):
                        p.unlink()
            if self.created:
                with contextlib.suppress(OSError):
                    self.path.rmdir()  # only if empty
            raise
