"""Request traces: the bench JSONL format, Mooncake's and Azure's real traces, and the scaling
that fits an hour of production traffic onto a small machine.

The bench JSONL format, one request per line (``arrival_s`` and ``osl`` are required, and
exactly one of ``prompt`` / ``isl``)::

    {"arrival_s": 0.0, "isl": 512, "osl": 64}                          # prompt: corpus text of 512 tokens
    {"arrival_s": 0.4, "prompt": "Write a haiku about the tide.", "osl": 32}   # sent as is
    {"arrival_s": 1.5, "isl": 900, "osl": 16, "hash_ids": [7, 8]}      # two prefix blocks
    {"arrival_s": 2.0, "isl": 100, "osl": 8, "pattern": "code"}        # label for the plots

``arrival_s`` is seconds from the start of the trace. ``hash_ids`` are prefix block ids as in
Mooncake's trace: requests whose first k ids agree share their first k blocks of prompt tokens
(``block_tokens`` per block, 512 unless the reader is told otherwise; the last block may be
partial), and the same id is the same text in every request. Mooncake lines
(``timestamp`` in ms, ``input_length``, ``output_length``, ``hash_ids``) and Azure's CSV
(``TIMESTAMP``, ``ContextTokens``, ``GeneratedTokens``) are read into the same records.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from kvtide.cluster.bench.corpus import OffsetDraw, TextCorpus
from kvtide.cluster.bench.workloads import Session, Turn

MOONCAKE_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    isl: int
    osl: int
    hash_ids: tuple[int, ...] = ()
    prompt: str | None = None
    """Sent as is when set (``isl`` is then its length under the bench's tokenizer, or 0 until counted)."""
    pattern: str = "trace"


@dataclass(frozen=True)
class Trace:
    requests: tuple[TraceRequest, ...]
    block_tokens: int
    """Tokens per prefix block of ``hash_ids``."""
    name: str


def _need(row: dict, key: str, where: str):
    if key not in row:
        raise ValueError(f"{where}: missing field {key!r} (have {sorted(row)})")
    return row[key]


def read_bench_jsonl(path: Path, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> Trace:
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        row = json.loads(line)
        prompt = row.get("prompt")
        if (prompt is None) == ("isl" not in row):
            raise ValueError(f"{where}: give exactly one of 'prompt' and 'isl', got {sorted(row)}")
        isl = int(row.get("isl", 0))
        osl = int(_need(row, "osl", where))
        if osl < 1 or (prompt is None and isl < 1):
            raise ValueError(f"{where}: isl and osl must be >= 1, got isl={row.get('isl')}, osl={osl}")
        out.append(TraceRequest(float(_need(row, "arrival_s", where)), isl, osl,
                                tuple(int(h) for h in row.get("hash_ids", ())), prompt,
                                str(row.get("pattern", "trace"))))  # fmt: skip
    return Trace(tuple(sorted(out, key=lambda r: r.arrival_s)), block_tokens, Path(path).stem)


def read_mooncake(path: Path) -> Trace:
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            row, where = json.loads(line), f"{path}:{n}"
            out.append(TraceRequest(float(_need(row, "timestamp", where)) / 1000.0,
                                    int(_need(row, "input_length", where)), int(_need(row, "output_length", where)),
                                    tuple(_need(row, "hash_ids", where)), pattern="mooncake"))  # fmt: skip
    return Trace(tuple(sorted(out, key=lambda r: r.arrival_s)), MOONCAKE_BLOCK_TOKENS, Path(path).stem)


def read_azure(path: Path) -> Trace:
    """Azure LLM inference trace 2023 (``azure2023_code.csv``: pattern ``azure-code``)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no requests")
    stem = Path(path).stem
    label = "azure-" + stem.rsplit("_", 1)[-1] if "_" in stem else stem
    times = [datetime.fromisoformat(_need(r, "TIMESTAMP", f"{path}:{i + 2}")) for i, r in enumerate(rows)]
    t0 = min(times)
    out = [TraceRequest((t - t0).total_seconds(), int(r["ContextTokens"]), int(r["GeneratedTokens"]), pattern=label)
           for t, r in zip(times, rows, strict=True)]  # fmt: skip
    return Trace(tuple(sorted(out, key=lambda r: r.arrival_s)), MOONCAKE_BLOCK_TOKENS, stem)


def read_trace(path: Path, fmt: str = "auto", block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> Trace:
    """``fmt``: ``auto`` (by suffix and first line), ``bench``, ``mooncake`` or ``azure``."""
    path = Path(path)
    if fmt == "auto":
        if path.suffix == ".csv":
            fmt = "azure"
        else:
            with path.open() as f:
                first = next((json.loads(line) for line in f if line.strip()), {})
            fmt = "mooncake" if "input_length" in first else "bench"
    readers = {"bench": lambda: read_bench_jsonl(path, block_tokens), "mooncake": lambda: read_mooncake(path),
               "azure": lambda: read_azure(path)}  # fmt: skip
    if fmt not in readers:
        raise ValueError(f"unknown trace format {fmt!r}; known: auto, {', '.join(readers)}")
    return readers[fmt]()


@dataclass(frozen=True)
class TraceScaling:
    """How a production trace is fitted onto this machine. Applied in this order: the time
    window, the sample, then time and length scaling, then the context limit."""

    start_s: float = 0.0
    """Keep requests arriving at or after this trace time..."""
    duration_s: float | None = None
    """...and before ``start_s + duration_s`` (None: to the end). Arrivals are shifted to start at 0."""
    sample: float = 1.0
    """Keep each request with this probability (seeded): thins the rate, keeps the time axis."""
    time_scale: float = 1.0
    """Multiply arrival times by this: 0.1 replays ten times faster."""
    length_scale: float = 1.0
    """Multiply ISL, OSL and the prefix block size by this (one factor, so prefix sharing is kept)."""
    max_model_len: int | None = None
    """Clip each request to fit: OSL to half of it at most, then ISL to the rest."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.sample <= 1:
            raise ValueError(f"trace sample must be in (0, 1], got {self.sample}")
        for name in ("time_scale", "length_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"trace {name} must be > 0, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class ScaledTrace:
    trace: Trace
    num_clipped: int
    """Requests shortened to fit ``max_model_len``."""


def scale_trace(trace: Trace, s: TraceScaling) -> ScaledTrace:
    end = math.inf if s.duration_s is None else s.start_s + s.duration_s
    kept = [r for r in trace.requests if s.start_s <= r.arrival_s < end]
    if s.sample < 1:
        keep = np.random.default_rng(s.seed).random(len(kept)) < s.sample
        kept = [r for r, k in zip(kept, keep, strict=True) if k]
    block = max(1, round(trace.block_tokens * s.length_scale))
    out, clipped = [], 0
    for r in kept:
        osl = max(1, round(r.osl * s.length_scale))
        isl = r.isl if r.prompt is not None else max(1, round(r.isl * s.length_scale))
        ids = r.hash_ids
        if ids:  # keep the prompt inside its blocks: more than k-1 blocks, at most k
            isl = min(max(isl, (len(ids) - 1) * block + 1), len(ids) * block)
        if s.max_model_len is not None and isl + osl > s.max_model_len and r.prompt is None:
            osl = min(osl, s.max_model_len // 2)
            isl = min(isl, s.max_model_len - osl)
            ids = ids[: math.ceil(isl / block)]
            clipped += 1
        arrival = (r.arrival_s - s.start_s) * s.time_scale
        out.append(dataclasses.replace(r, arrival_s=arrival, isl=isl, osl=osl, hash_ids=ids))
    return ScaledTrace(Trace(tuple(out), block, trace.name), clipped)


def describe_scaling(trace: Trace, scaled: ScaledTrace, s: TraceScaling) -> str:
    reqs = scaled.trace.requests
    span = reqs[-1].arrival_s if reqs else 0.0
    window = f"trace time [{s.start_s:g} s, {'end' if s.duration_s is None else f'{s.start_s + s.duration_s:g} s'})"
    isl = np.mean([r.isl for r in reqs]) if reqs else 0
    osl = np.mean([r.osl for r in reqs]) if reqs else 0
    return (f"trace {trace.name} ({len(trace.requests)} requests): {window}, sample {s.sample:g}, "
            f"time x{s.time_scale:g}, lengths x{s.length_scale:g} (prefix block {scaled.trace.block_tokens} "
            f"tokens): {len(reqs)} requests over {span:.1f} s, mean ISL {isl:.0f}, mean OSL {osl:.0f}, "
            f"{scaled.num_clipped} clipped to the context")  # fmt: skip


def write_bench_jsonl(path: Path, requests: Sequence[TraceRequest]) -> None:
    """The bench JSONL format (the reader's inverse), e.g. to save a scaled trace."""
    with Path(path).open("w") as f:
        for r in requests:
            row: dict = {"arrival_s": r.arrival_s, "osl": r.osl, "pattern": r.pattern}
            row.update({"prompt": r.prompt} if r.prompt is not None else {"isl": r.isl})
            if r.hash_ids:
                row["hash_ids"] = list(r.hash_ids)
            f.write(json.dumps(row) + "\n")


@dataclass(frozen=True)
class TraceWorkload:
    """One single-turn session per request, sent at its (scaled) arrival time. Prompts with
    ``hash_ids`` are made of their blocks' text; ``prompt`` is sent as is; the rest get fresh
    corpus text."""

    scaled: ScaledTrace
    corpus: TextCorpus
    count_tokens: Callable[[str], int]
    seed: int
    description: str

    def sessions(self, salt: int = 0) -> Iterator[Session]:
        offsets = OffsetDraw(self.corpus.num_units, np.random.default_rng([self.seed, 1, salt]))
        block = self.scaled.trace.block_tokens
        for i, r in enumerate(self.scaled.trace.requests):
            if r.prompt is not None:
                text, isl = r.prompt, self.count_tokens(r.prompt)
            elif r.hash_ids:
                text, isl = self.corpus.blocks_text(r.hash_ids, block, r.isl, self.seed, salt), r.isl
            else:
                text, isl = self.corpus.text(offsets(), r.isl), r.isl
            yield Session(i, (Turn(text, isl, r.osl, r.pattern),), arrival_s=r.arrival_s)

    def describe(self) -> str:
        return self.description
