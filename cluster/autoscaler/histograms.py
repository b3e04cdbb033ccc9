"""A window of a cumulative histogram: the Prometheus buckets the frontend keeps, read twice.

The frontend observes TTFT, ITL and lengths into cumulative histograms; what the control loop
needs is their distribution over the last window. The difference of two readings is the
window's histogram, and its percentiles are read off the buckets: the q-quantile is the upper
bound of the first bucket holding a fraction q of the window's samples (so it overstates by
at most one bucket's width, the safe side for an SLO). Samples past the last finite bound
read as that bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvtide.cluster.autoscaler.observation import Percentiles


@dataclass(frozen=True)
class Histogram:
    bounds: tuple[float, ...]
    """Upper bounds of the buckets, ascending (the last may be +inf)."""
    cumulative: tuple[float, ...]
    """Samples at or below each bound since the start."""
    total: float
    """Sum of the samples since the start."""

    def __post_init__(self) -> None:
        if len(self.bounds) != len(self.cumulative) or not self.bounds:
            raise ValueError(f"bounds ({len(self.bounds)}) and cumulative ({len(self.cumulative)}) must pair up")
        if list(self.bounds) != sorted(self.bounds):
            raise ValueError(f"bounds must ascend, got {self.bounds}")

    @property
    def count(self) -> float:
        return self.cumulative[-1]

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> Histogram:
        return cls(tuple(bounds), (0.0,) * len(bounds), 0.0)

    @classmethod
    def from_prometheus(cls, metric) -> Histogram:
        """A ``prometheus_client.Histogram`` (no labels) as it reads now."""
        buckets: list[tuple[float, float]] = []
        total = 0.0
        for family in metric.collect():
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    buckets.append((float(s.labels["le"]), s.value))
                elif s.name.endswith("_sum"):
                    total = s.value
        buckets.sort()
        return cls(tuple(b for b, _ in buckets), tuple(c for _, c in buckets), total)


def window_percentiles(base: Histogram, now: Histogram) -> Percentiles | None:
    """Percentiles of the samples ``now`` has and ``base`` (an earlier reading) had not; None
    when there are none."""
    if base.bounds != now.bounds:
        raise ValueError(f"the readings' buckets differ: {base.bounds} vs {now.bounds}")
    delta = [max(0.0, n - b) for n, b in zip(now.cumulative, base.cumulative, strict=True)]
    count = delta[-1]
    if count <= 0:
        return None
    finite = [b for b in now.bounds if math.isfinite(b)]
    last = finite[-1] if finite else 0.0

    def at(q: float) -> float:
        need = max(1.0, math.ceil(round(q * count, 9)))
        for bound, seen in zip(now.bounds, delta, strict=True):
            if seen >= need:
                return bound if math.isfinite(bound) else last
        return last

    mean = max(0.0, now.total - base.total) / count
    return Percentiles(mean=mean, p50=at(0.5), p90=at(0.9), p99=at(0.99))
