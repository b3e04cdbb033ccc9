"""What a section of the GPU check reports: rows of checks, a table and a JSON summary.

A row's status is one of ``ok``, ``FAIL``, ``warn`` (runs, but off what was predicted),
``info`` (a number to read), ``not available: <what>`` (a piece of kvtide or of the machine
that is not there yet; the rest goes on), ``skipped: <why>`` or ``dry-run`` (what the section
would run). Only ``FAIL`` makes the run fail.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


class NotAvailable(Exception):
    """A piece the check needs is missing; the message says what (``not available: <what>``)."""


@dataclass(frozen=True)
class Row:
    check: str
    value: str
    status: str
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    """Numbers behind ``value``, for the JSON summary."""


@dataclass
class SectionResult:
    name: str
    what: str
    estimate_s: float
    seconds: float = 0.0
    rows: list[Row] = field(default_factory=list)
    error: str | None = None

    @property
    def status(self) -> str:
        statuses = [r.status for r in self.rows]
        if self.error is not None or "FAIL" in statuses:
            return "FAIL"
        for prefix in ("not available", "skipped", "warn", "dry-run"):
            if any(s.startswith(prefix) for s in statuses):
                return prefix
        return "ok"


def fraction(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.1%}" if denominator else "n/a"


def row_for(check: str, ok: bool, value: str, detail: str = "", **data: Any) -> Row:
    return Row(check, value, "ok" if ok else "FAIL", detail, data)


def table(sections: list[SectionResult], width: int = 118) -> str:
    """Fixed-width text: one line per row, the section's time against its estimate."""
    lines = [f"{'section':<16} {'check':<34} {'result':<28} status / detail", "-" * width]
    for s in sections:
        head = f"{s.name} ({s.seconds:.0f}s of ~{s.estimate_s:.0f}s)"
        lines.append(f"{head:<51} [{s.status}]")
        if s.error:
            lines.append(f"{'':<16} {'error':<34} {'':<28} FAIL - {_clip(s.error, 2 * width)}")
        for r in s.rows:
            line = f"{'':<16} {_clip(r.check, 34):<34} {_clip(r.value, 28):<28} {_clip(r.status, 200)}"
            if r.detail:
                line += f" - {_clip(r.detail, 2 * width)}"
            lines.append(line)
    return "\n".join(lines)


def summary(sections: list[SectionResult], meta: dict[str, Any]) -> dict[str, Any]:
    failed = [s.name for s in sections if s.status == "FAIL"]
    return {
        **meta,
        "ok": not failed,
        "failed_sections": failed,
        "sections": [{**asdict(s), "status": s.status} for s in sections],
    }


def to_json(data: dict[str, Any]) -> str:
    return json.dumps(_finite(data), indent=1, sort_keys=False, default=str)


def _finite(x: Any) -> Any:
    """JSON has no NaN or infinity: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _clip(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."
