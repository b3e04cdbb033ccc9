"""What a policy sees (``Observation``) and what it decides (``Target``, ``Decision``).

An observation summarizes one window of the cluster's metrics at one instant; a target is
the number of replicas wanted per engine profile, with the reason as text (it is logged and
published with the decision). Both are frozen; their mappings are read-only views.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, NamedTuple


def _frozen_counts(name: str, counts: Mapping[str, int]) -> Mapping[str, int]:
    for profile, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{name}[{profile!r}] must be an int >= 0, got {n!r}")
    return MappingProxyType(dict(counts))


def check_replica_bounds(min_replicas: int, max_replicas: int) -> None:
    """Raise ``ValueError`` naming the field unless 0 <= min_replicas <= max_replicas (ints)."""
    for name, value in (("min_replicas", min_replicas), ("max_replicas", max_replicas)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: {value!r} must be an int >= 0")
    if max_replicas < min_replicas:
        raise ValueError(f"max_replicas: {max_replicas} is below min_replicas {min_replicas}")


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values by nearest rank: the smallest value with at least a
    fraction q of the values at or below it (q*n is rounded to 9 digits first, so 0.9 of 10
    values is the 9th, not the 10th)."""
    k = max(1, math.ceil(round(q * len(ordered), 9)))
    return ordered[min(len(ordered), k) - 1]


@dataclass(frozen=True)
class Percentiles:
    """Summary of a distribution (seconds for latencies, tokens for lengths)."""

    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles | None:
        """Nearest-rank percentiles of ``values``; None when there are none."""
        if not values:
            return None
        s = sorted(values)
        return cls(mean=sum(s) / len(s), p50=float(nearest_rank(s, 0.5)), p90=float(nearest_rank(s, 0.9)),
                   p99=float(nearest_rank(s, 0.99)))


@dataclass(frozen=True)
class Observation:
    """One window of the cluster's metrics, ending at ``time``."""

    time: datetime
    """End of the window; timezone-aware (policies convert it to their own timezone)."""
    window_s: float
    request_rate: float
    """Arrivals per second over the window."""
    queue_depth: int
    """Requests waiting for admission now, fleet-wide (gateway queue plus replicas' queues)."""
    kv_usage: float
    """Mean KV cache usage (0..1) over the ready replicas now."""
    ttft_s: Percentiles | None
    """Time to first token of the requests whose first token came in the window (None: none)."""
    itl_s: Percentiles | None
    """Inter-token latency, one sample per token, over the window (None: none)."""
    isl: Percentiles | None
    """Prompt lengths of the window's arrivals, in tokens."""
    osl: Percentiles | None
    """Output lengths of the window's finished requests, in tokens."""
    replicas: Mapping[str, int]
    """Replicas per engine profile that serve or will: ready plus starting, not draining."""
    starting: Mapping[str, int] = field(default_factory=dict)
    """Of ``replicas``, those still in their cold start."""
    cold_start_s: float = 0.0
    """Seconds from asking for a replica to its first request."""

    def __post_init__(self) -> None:
        if self.time.tzinfo is None or self.time.utcoffset() is None:
            raise ValueError(f"Observation.time must be timezone-aware, got {self.time.isoformat()}")
        for name in ("window_s", "request_rate", "cold_start_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Observation.{name} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.kv_usage) and 0.0 <= self.kv_usage <= 1.0):
            raise ValueError(f"Observation.kv_usage must be in [0, 1], got {self.kv_usage}")
        if self.queue_depth < 0:
            raise ValueError(f"Observation.queue_depth must be >= 0, got {self.queue_depth}")
        object.__setattr__(self, "replicas", _frozen_counts("Observation.replicas", self.replicas))
        object.__setattr__(self, "starting", _frozen_counts("Observation.starting", self.starting))
        for profile, n in self.starting.items():
            if n > self.replicas.get(profile, 0):
                raise ValueError(
                    f"Observation.starting[{profile!r}]: {n} is more than replicas[{profile!r}] "
                    f"{self.replicas.get(profile, 0)}"
                )

    @property
    def num_replicas(self) -> int:
        return sum(self.replicas.values())

    @property
    def num_ready(self) -> int:
        return self.num_replicas - sum(self.starting.values())


@dataclass(frozen=True)
class Target:
    """Replicas wanted per engine profile; profiles not named are wanted at zero."""

    replicas: Mapping[str, int]
    reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "replicas", _frozen_counts("Target.replicas", self.replicas))

    @property
    def total(self) -> int:
        return sum(self.replicas.values())

    def __str__(self) -> str:
        counts = ", ".join(f"{p}={n}" for p, n in sorted(self.replicas.items())) or "none"
        return f"{counts}: {self.reason}"


class Decision(NamedTuple):
    """A policy's answer: the target, and the policy's state to pass to its next call."""

    target: Target
    state: Any
