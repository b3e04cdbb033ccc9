"""Request traces as ISL/OSL samples and timed arrivals, whatever file they come in.

Formats, told apart by suffix (``.gz`` is read through gzip) and columns:

- JSONL, one request a line: ``isl`` and ``osl`` (a ``kvtide bench`` records file, whose
  warmup and failed requests, ``"warmup": true`` or an ``error_code``, are left out as the
  bench's summary leaves them out; an ``arrival_s`` key, when there, times a request), or
  Mooncake's ``input_length``, ``output_length`` and ``timestamp`` (ms);
- CSV with a header: Azure's ``TIMESTAMP,ContextTokens,GeneratedTokens``, or
  ``arrival_s,isl,osl[,service]`` (bench/day_trace.py's day).

Lines whose lengths are missing or not positive integers are errors naming the line.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Arrival:
    arrival_s: float
    """Seconds: as the trace writes them (``arrival_s``; Mooncake's ``timestamp`` in ms), or
    after the first request for Azure's wall-clock stamps."""
    isl: int
    osl: int
    service: str = ""


def _open(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _length(value: Any, where: str, key: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or (isinstance(value, float) and value != n):
        raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    return n


def _jsonl(path: Path) -> Iterator[tuple[float | None, int, int, str]]:
    with _open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc.msg})") from None
            if row.get("warmup") is True or row.get("error_code") is not None:
                continue  # as the bench's own summary: warmups and failed requests do not count
            if "isl" in row or "osl" in row:
                t = row.get("arrival_s")
                yield (None if t is None else float(t), _length(row.get("isl"), where, "isl"),
                       _length(row.get("osl"), where, "osl"), str(row.get("service", "")))
            elif "input_length" in row:
                t = row.get("timestamp")
                yield (None if t is None else float(t) / 1000, _length(row["input_length"], where, "input_length"),
                       _length(row.get("output_length"), where, "output_length"), "")
            else:
                raise ValueError(f"{where}: needs isl and osl (or Mooncake's input_length/output_length)")


def _csv(path: Path) -> Iterator[tuple[float | None, int, int, str]]:
    with _open(path) as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        azure = {"ContextTokens", "GeneratedTokens"} <= columns
        if not azure and not {"isl", "osl"} <= columns:
            raise ValueError(f"{path}: a CSV trace needs columns ContextTokens,GeneratedTokens (Azure) or isl,osl; "
                             f"it has {', '.join(sorted(columns))}")
        first: datetime | None = None
        for number, row in enumerate(reader, 2):
            where = f"{path}:{number}"
            if azure:
                # Azure writes 7 fractional digits; datetime takes 6.
                stamp = datetime.fromisoformat(row["TIMESTAMP"][:26]) if row.get("TIMESTAMP") else None
                if stamp is not None and first is None:
                    first = stamp
                t = None if stamp is None else (stamp - first).total_seconds()
                yield t, _length(row["ContextTokens"], where, "ContextTokens"), \
                    _length(row["GeneratedTokens"], where, "GeneratedTokens"), ""
            else:
                t = row.get("arrival_s")
                yield (float(t) if t not in (None, "") else None, _length(row["isl"], where, "isl"),
                       _length(row["osl"], where, "osl"), row.get("service") or "")


def _rows(path: str | Path) -> Iterator[tuple[float | None, int, int, str]]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix == ".gz" else path
    if stem.suffix == ".csv":
        return _csv(path)
    if stem.suffix in (".jsonl", ".json"):
        return _jsonl(path)
    raise ValueError(f"{path}: unknown trace format; expected .jsonl or .csv (optionally .gz)")


def read_lengths(path: str | Path, window_s: tuple[float, float] | None = None) -> tuple[list[int], list[int]]:
    """(ISL list, OSL list) of the trace's requests; with ``window_s`` = (start, end), only
    those whose arrival time modulo a day is in [start, end) (for a day trace whose times
    count from local midnight, such as bench/day_trace.py's)."""
    isl, osl = [], []
    for t, i, o, _ in _rows(path):
        if window_s is not None:
            if t is None:
                raise ValueError(f"{path}: a time window needs arrival times, and a request has none")
            if not window_s[0] <= t % 86400 < window_s[1]:
                continue
        isl.append(i)
        osl.append(o)
    if not isl:
        raise ValueError(f"{path}: no requests" + (" in the window" if window_s else ""))
    return isl, osl


def read_arrivals(path: str | Path) -> list[Arrival]:
    """Timed requests, sorted by arrival."""
    rows = list(_rows(path))
    if not rows:
        raise ValueError(f"{path}: no requests")
    missing = sum(1 for t, *_ in rows if t is None)
    if missing:
        raise ValueError(f"{path}: {missing} of {len(rows)} requests have no arrival time")
    return sorted((Arrival(t, i, o, s) for t, i, o, s in rows), key=lambda a: a.arrival_s)
