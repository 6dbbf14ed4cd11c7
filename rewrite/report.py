"""The compile report: what each pass did and what it cost, as data and as text.

A `Report` is a pydantic model (so it serialises to JSON losslessly) with renderers for a
terminal table, Markdown and JSON. Passes put their decisions (scores, removed groups,
bit assignments) in `PassRecord.details` and plain-language caveats in `notes`.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from .measure import Cost, Fidelity


class PassRecord(BaseModel):
    name: str
    kind: str
    seconds: float
    cost: Cost
    fidelity: Fidelity | None = None
    fidelity_calibration: Fidelity | None = None
    """The same fidelity on (some of) the calibration batches the passes fit on: next to `fidelity`
    (held-back batches) it shows over-fitting."""
    summary: str = ""
    details: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)


class ExportRecord(BaseModel):
    backend: str
    path: str
    bytes: int
    seconds: float
    verified: bool
    max_abs_error: float | None = None
    rel_error: float | None = None
    cosine: float | None = None
    provider: str | None = None
    notes: list[str] = Field(default_factory=list)


class Report(BaseModel):
    model: str
    before: Cost
    after: Cost
    passes: list[PassRecord] = Field(default_factory=list)
    fidelity: Fidelity | None = None
    calibration: str = ""
    exports: list[ExportRecord] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    """Task metrics measured outside the pipeline (e.g. STS-B Spearman before/after)."""

    # -- rendering ---------------------------------------------------------------------
    def rows(self) -> list[list[str]]:
        head = ["step", "params", "FLOPs", "weights MB", "cosine", "rel err", "time s"]
        rows = [head, ["original", _n(self.before.params), _n(self.before.flops), f"{self.before.weight_mb:.2f}", "1.000000", "0", "-"]]
        for p in self.passes:
            f = p.fidelity
            rows.append([
                p.name, _n(p.cost.params), _n(p.cost.flops), f"{p.cost.weight_mb:.2f}",
                f"{f.cosine:.6f}" if f else "n/a", f"{f.rel_error:.2e}" if f else "n/a", f"{p.seconds:.1f}",
            ])
        rows.append(["total (after/before)", _r(self.after.params, self.before.params), _r(self.after.flops, self.before.flops),
                     _r(self.after.weight_bytes, self.before.weight_bytes),
                     f"{self.fidelity.cosine:.6f}" if self.fidelity else "n/a",
                     f"{self.fidelity.rel_error:.2e}" if self.fidelity else "n/a",
                     f"{sum(p.seconds for p in self.passes):.1f}"])
        return rows

    def to_table(self) -> str:
        """A plain-text table for the terminal."""
        rows = self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"rewrite report: {self.model}"]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        lines += self._prose(markdown=False)
        return "\n".join(lines)

    def to_markdown(self) -> str:
        rows = self.rows()
        out = [f"# rewrite report: {self.model}", ""]
        if self.calibration:
            out += [f"Calibration: {self.calibration}", ""]
        out.append("| " + " | ".join(rows[0]) + " |")
        out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(rows[0]))) + "|")
        for r in rows[1:]:
            out.append("| " + " | ".join(r) + " |")
        out.append("")
        out += self._prose(markdown=True)
        for p in self.passes:
            if p.details:
                out += ["", f"## {p.name}", ""]
                out += _details_markdown(p.details)
        return "\n".join(out) + "\n"

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def _prose(self, markdown: bool) -> list[str]:
        bullet = "- " if markdown else "  * "
        out = []
        for p in self.passes:
            for line in ([p.summary] if p.summary else []) + p.notes:
                out.append(f"{bullet}{p.name}: {line}")
        for e in self.exports:
            status = "verified" if e.verified else "NOT verified"
            err = f", max abs error {e.max_abs_error:.2e}, rel error {e.rel_error:.2e}" if e.max_abs_error is not None else ""
            out.append(f"{bullet}export {e.backend}: {e.path} ({e.bytes / 1e6:.2f} MB), {status}{err}" + (f" on {e.provider}" if e.provider else ""))
            out += [f"{bullet}export {e.backend}: {n}" for n in e.notes]
        out += self._overfit_lines(bullet)
        out += [f"{bullet}{k}: {v}" for k, v in self.metrics.items()]
        out += [f"{bullet}warning: {w}" for w in self.warnings]
        return out

    def _overfit_lines(self, bullet: str) -> list[str]:
        """Per pass: output cosine on calibration batches next to held-back batches (over-fitting shows as a gap)."""
        out = []
        for p in self.passes:
            if p.fidelity is not None and p.fidelity_calibration is not None:
                gap = p.fidelity_calibration.cosine - p.fidelity.cosine
                out.append(f"{bullet}{p.name}: cosine {p.fidelity_calibration.cosine:.6f} on calibration batches, "
                           f"{p.fidelity.cosine:.6f} on held-back batches"
                           + (f" (gap {gap:.2e}: the fit may be over-fitting)" if gap > 1e-3 else ""))
        return out

    def __str__(self) -> str:
        return self.to_table()


def _n(x: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(x)


def _r(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def _details_markdown(details: dict[str, Any]) -> list[str]:
    out = []
    for key, value in details.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            cols = list(value[0].keys())
            out += [f"**{key}**", "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
            for row in value:
                out.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
            out.append("")
        else:
            out.append(f"- **{key}**: {_fmt(value)}")
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) > 12:
        return ", ".join(_fmt(x) for x in v[:12]) + f", ... ({len(v)} in all)"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)
