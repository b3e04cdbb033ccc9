"""Summary statistics of one load point's records: latency percentiles, throughput, goodput
and the TTFT-against-ISL slope. Warm-up records are left out of everything.

Definitions (latencies in ms):
- TTFT: send to the first token. ITL: every gap between consecutive tokens, pooled over all
  requests (so long answers weigh more, as in vLLM's benchmark). TPOT: per request, the mean
  gap after the first token, ``(e2e - ttft) / (osl - 1)``. E2E: send to the end of the stream.
- The window is the first measured request's start to the last one's end; output tokens/s
  and requests/s count successful requests over it.
- Goodput is per request (DistServe, vLLM's ``--goodput``): a request is good when it
  succeeded and met every SLO given (TTFT, TPOT, E2E); goodput is good requests per second
  of window, and the good fraction is good / measured requests (failures count as not good).
- The TTFT slope is the least-squares line TTFT = a + b * ISL over successful requests,
  reported as b in ms per 1k input tokens, with a and R^2.
- Prefix-cache hits: input tokens the server says it served from its prefix cache, as a share
  of the input tokens of the successful requests that reported it (None when none did).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvtide.cluster.bench.records import RequestRecord

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Dist:
    p50: float
    p90: float
    p99: float
    mean: float
    count: int


def dist(values: Sequence[float], scale: float = 1.0) -> Dist | None:
    if len(values) == 0:
        return None
    a = np.asarray(values, dtype=float) * scale
    p50, p90, p99 = (float(v) for v in np.percentile(a, PERCENTILES))
    return Dist(p50, p90, p99, float(a.mean()), len(a))


@dataclass(frozen=True)
class SLO:
    """Per-request bounds; None means not constrained."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met_by(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        checks = ((self.ttft_ms, r.ttft_s), (self.e2e_ms, r.e2e_s), (self.tpot_ms, r.tpot_s))
        return all(bound is None or value is None or value * 1000 <= bound for bound, value in checks)

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None

    def describe(self) -> str:
        parts = [f"{f.name} <= {getattr(self, f.name):g}" for f in dataclasses.fields(self) if getattr(self, f.name)]
        return ", ".join(parts) or "none"


def parse_slo(text: str | None) -> SLO:
    """``"ttft_ms=2000,tpot_ms=100,e2e_ms=30000"`` (any subset)."""
    if not text:
        return SLO()
    known = {f.name for f in dataclasses.fields(SLO)}
    values = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        if key not in known:
            raise ValueError(f"unknown SLO {key!r} in --slo; known: {', '.join(sorted(known))}")
        try:
            values[key] = float(value)
        except ValueError as exc:
            raise ValueError(f"--slo {key} must be a number of ms, got {value!r}") from exc
        if values[key] <= 0:
            raise ValueError(f"--slo {key} must be > 0 ms, got {value}")
    return SLO(**values)


@dataclass(frozen=True)
class Fit:
    ms_per_1k_tokens: float
    intercept_ms: float
    r2: float
    num_points: int


def ttft_fit(records: Sequence[RequestRecord]) -> Fit | None:
    pts = [(r.isl, r.ttft_s * 1000) for r in records if r.ok and r.ttft_s is not None]
    if len({x for x, _ in pts}) < 2:
        return None
    x, y = np.array(pts, dtype=float).T
    # The closed form on centered data: a flat TTFT gives a slope of exactly 0 (np.polyfit's
    # solver returned 2e-18 for it from numpy 2.4, which read as a positive prefill cost).
    dx, dy = x - x.mean(), y - y.mean()
    slope = float((dx * dy).sum() / (dx * dx).sum())
    intercept = float(y.mean() - slope * x.mean())
    residual = y - (intercept + slope * x)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    return Fit(float(slope) * 1000, float(intercept), r2, len(pts))


@dataclass(frozen=True)
class Goodput:
    slo: str
    num_good: int
    fraction: float
    requests_per_s: float


@dataclass(frozen=True)
class PointSummary:
    target: str
    point: str
    num_requests: int
    num_ok: int
    errors: dict[str, int]
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    input_tokens_per_s: float
    mean_isl: float
    mean_osl: float
    ttft_ms: Dist | None
    itl_ms: Dist | None
    tpot_ms: Dist | None
    e2e_ms: Dist | None
    ttft_fit: Fit | None
    goodput: Goodput | None
    prefix_cache_hit: float | None = None
    client_cpu_s: float | None = None
    """CPU time the bench process spent on this point (user + system)."""
    client_cpu_us_per_token: float | None = None
    client_loop_lag_ms: Dist | None = None
    """How late the bench's event loop woke a 50 ms sleeper: the client's own delay."""


def summarize(records: Sequence[RequestRecord], slo: SLO = SLO()) -> PointSummary:
    measured = [r for r in records if not r.warmup]
    if not measured:
        raise ValueError("no measured records (all were warm-up, or none ran)")
    ok = [r for r in measured if r.ok]
    window = max(r.end_s for r in measured) - min(r.start_s for r in measured)
    window = max(window, 1e-9)
    out_tokens = sum(r.osl for r in ok)
    reported = [r for r in ok if r.cached_tokens is not None]
    hit = sum(r.cached_tokens for r in reported) / max(1, sum(r.isl for r in reported)) if reported else None
    goodput = None
    if not slo.empty:
        good = sum(slo.met_by(r) for r in measured)
        goodput = Goodput(slo.describe(), good, good / len(measured), good / window)
    return PointSummary(
        target=measured[0].target,
        point=measured[0].point,
        num_requests=len(measured),
        num_ok=len(ok),
        errors=dict(Counter(r.error_code for r in measured if not r.ok)),
        duration_s=window,
        requests_per_s=len(ok) / window,
        output_tokens_per_s=out_tokens / window,
        input_tokens_per_s=sum(r.isl for r in ok) / window,
        mean_isl=float(np.mean([r.isl for r in ok])) if ok else 0.0,
        mean_osl=float(np.mean([r.osl for r in ok])) if ok else 0.0,
        ttft_ms=dist([r.ttft_s for r in ok if r.ttft_s is not None], 1000),
        itl_ms=dist([g for r in ok for g in r.itl_s], 1000),
        tpot_ms=dist([r.tpot_s for r in ok if r.tpot_s is not None], 1000),
        e2e_ms=dist([r.e2e_s for r in ok], 1000),
        ttft_fit=ttft_fit(ok),
        goodput=goodput,
        prefix_cache_hit=hit,
    )


def group(records: Sequence[RequestRecord]) -> dict[tuple[str, str], list[RequestRecord]]:
    """Records by (target, point), in the order they first appear."""
    out: dict[tuple[str, str], list[RequestRecord]] = {}
    for r in records:
        out.setdefault((r.target, r.point), []).append(r)
    return out


def summary_from_dict(row: dict) -> PointSummary:
    """Inverse of ``dataclasses.asdict`` on a ``PointSummary`` (summary.json)."""
    row = dict(row)
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "client_loop_lag_ms"):
        row[key] = Dist(**row[key]) if row.get(key) else None
    row["ttft_fit"] = Fit(**row["ttft_fit"]) if row.get("ttft_fit") else None
    row["goodput"] = Goodput(**row["goodput"]) if row.get("goodput") else None
    return PointSummary(**row)
