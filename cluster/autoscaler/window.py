"""``MetricsWindow``: request events over a sliding window, summarized as an ``Observation``.

The control loop feeds it what the gateway sees (and the fleet simulator what its replicas
do): arrivals, first tokens, inter-token gaps and finished requests, each stamped with its
time in seconds on one monotonic clock. ``observe`` drops what is older than ``window_s``
and summarizes the rest; the fleet's instantaneous state (queue, KV usage, replicas) comes
from the caller. Not thread-safe: one owner feeds and reads it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from datetime import datetime

from kvtide.cluster.autoscaler.observation import Observation, Percentiles


def weighted_percentiles(samples: list[tuple[float, float]]) -> Percentiles | None:
    """Percentiles of values with weights, ``samples`` as (value, weight): a value with weight
    16 counts as 16 samples (a decode step of 16 rows gives 16 inter-token gaps)."""
    total = sum(w for _, w in samples)
    if total <= 0:
        return None
    ordered = sorted(samples)

    def at(q: float) -> float:
        need, seen = q * total, 0.0
        for value, weight in ordered:
            seen += weight
            if seen >= need - 1e-9:
                return value
        return ordered[-1][0]

    return Percentiles(mean=sum(v * w for v, w in ordered) / total, p50=at(0.5), p90=at(0.9), p99=at(0.99))


class MetricsWindow:
    def __init__(self, window_s: float) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s: {window_s} must be > 0")
        self.window_s = window_s
        self._arrivals: deque[tuple[float, int]] = deque()
        self._ttfts: deque[tuple[float, float]] = deque()
        self._itls: deque[tuple[float, float, float]] = deque()
        self._finished: deque[tuple[float, int]] = deque()

    def arrived(self, t: float, num_prompt_tokens: int) -> None:
        self._arrivals.append((t, num_prompt_tokens))

    def first_token(self, t: float, ttft_s: float) -> None:
        self._ttfts.append((t, ttft_s))

    def tokens(self, t: float, gap_s: float, num_tokens: float) -> None:
        """``num_tokens`` tokens each came ``gap_s`` after the previous token of its request."""
        if num_tokens > 0:
            self._itls.append((t, gap_s, num_tokens))

    def finished(self, t: float, num_output_tokens: int) -> None:
        self._finished.append((t, num_output_tokens))

    def observe(self, now_s: float, when: datetime, *, queue_depth: int, kv_usage: float,
                replicas: Mapping[str, int], starting: Mapping[str, int], cold_start_s: float) -> Observation:
        """The window ending at ``now_s`` (``when`` is the same instant as an aware datetime)."""
        start = now_s - self.window_s
        for events in (self._arrivals, self._ttfts, self._itls, self._finished):
            while events and events[0][0] <= start:
                events.popleft()
        return Observation(
            time=when, window_s=self.window_s, request_rate=len(self._arrivals) / self.window_s,
            queue_depth=queue_depth, kv_usage=min(1.0, max(0.0, kv_usage)),
            ttft_s=Percentiles.of([s for _, s in self._ttfts]),
            itl_s=weighted_percentiles([(g, w) for _, g, w in self._itls]),
            isl=Percentiles.of([n for _, n in self._arrivals]), osl=Percentiles.of([n for _, n in self._finished]),
            replicas=replicas, starting=starting, cold_start_s=cold_start_s,
        )

