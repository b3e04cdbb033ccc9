"""Load history and its forecast: the same time of day on earlier days, times the recent trend.

History is kept in buckets of ``bucket_s`` seconds of local time (so "09:00" is 09:00 on
both sides of a DST change), each with the mean and the peak (component by component) of
the observations that fell in it: an observation is one window (say a minute), so the peak
is the bucket's busiest minute. The forecast for a future time is

    seasonal(t) = mean over earlier days d (of t's kind, weekday or weekend, when there are
                  any, else all) of the bucket at t's time of day on d (its mean, or with
                  ``peak`` its peak: what bursts reach at that time of day)
    trend       = observed / seasonal over the last ``trend_window_s``, clipped to
                  [trend_min, trend_max] (1 when either is missing or the seasonal is ~0)
    forecast(t) = seasonal(t) * trend

With no earlier day at t's time of day the forecast is the latest observed load
(persistence). ``History`` is immutable: ``observe`` returns a new one that shares the closed
buckets with the old.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo

from kvtide.cluster.autoscaler.observation import Observation


@dataclass(frozen=True)
class Load:
    """Offered load: requests, prompt tokens and output tokens per second."""

    request_rate: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0

    @classmethod
    def of(cls, obs: Observation) -> Load:
        isl = obs.isl.mean if obs.isl else 0.0
        osl = obs.osl.mean if obs.osl else 0.0
        return cls(obs.request_rate, obs.request_rate * isl, obs.request_rate * osl)

    def scaled(self, factor: float) -> Load:
        return Load(self.request_rate * factor, self.prefill_tokens_per_s * factor, self.decode_tokens_per_s * factor)

    def max(self, other: Load) -> Load:
        return Load(max(self.request_rate, other.request_rate),
                    max(self.prefill_tokens_per_s, other.prefill_tokens_per_s),
                    max(self.decode_tokens_per_s, other.decode_tokens_per_s))

    def plus(self, other: Load) -> Load:
        return Load(self.request_rate + other.request_rate, self.prefill_tokens_per_s + other.prefill_tokens_per_s,
                    self.decode_tokens_per_s + other.decode_tokens_per_s)

    @staticmethod
    def mean(loads: list[Load]) -> Load:
        n = len(loads)
        return Load(
            sum(x.request_rate for x in loads) / n,
            sum(x.prefill_tokens_per_s for x in loads) / n,
            sum(x.decode_tokens_per_s for x in loads) / n,
        )


BucketKey = tuple[int, int]
"""(local date ordinal, bucket of the day)."""


@dataclass(frozen=True)
class ForecastConfig:
    timezone: str = "UTC"
    bucket_s: int = 300
    history_days: int = 7
    trend_window_s: float = 3600.0
    """Long against bursts (minutes), so the trend follows the level of the day, not its noise."""
    trend_min: float = 0.5
    trend_max: float = 2.0

    def __post_init__(self) -> None:
        if not (isinstance(self.bucket_s, int) and 60 <= self.bucket_s <= 3600 and 86400 % self.bucket_s == 0):
            raise ValueError(f"bucket_s: {self.bucket_s!r} must be an int in [60, 3600] that divides 86400")
        if not (isinstance(self.history_days, int) and 1 <= self.history_days <= 60):
            raise ValueError(f"history_days: {self.history_days!r} must be an int in [1, 60]")
        if not (math.isfinite(self.trend_window_s) and self.trend_window_s >= self.bucket_s):
            raise ValueError(f"trend_window_s: {self.trend_window_s} is below bucket_s {self.bucket_s}")
        if not 0 < self.trend_min <= 1 <= self.trend_max:
            raise ValueError(f"trend_min, trend_max: {self.trend_min}, {self.trend_max} must satisfy 0 < min <= 1 <= max")

    def key(self, when: datetime) -> BucketKey:
        local = when.astimezone(ZoneInfo(self.timezone))
        seconds = local.hour * 3600 + local.minute * 60 + local.second
        return local.toordinal(), seconds // self.bucket_s


class Bucket(NamedTuple):
    mean: Load
    peak: Load


@dataclass(frozen=True)
class History:
    closed: dict[BucketKey, Bucket]
    """Finished buckets. NOTE: shared between successive Histories; never mutated in place."""
    open_key: BucketKey | None = None
    open_sum: Load = Load()
    open_peak: Load = Load()
    open_count: int = 0

    def observe(self, key: BucketKey, load: Load, history_days: int) -> History:
        if key == self.open_key:
            return replace(self, open_sum=self.open_sum.plus(load), open_peak=self.open_peak.max(load),
                           open_count=self.open_count + 1)
        closed = self.closed
        if self.open_key is not None:
            oldest = key[0] - history_days
            closed = {k: v for k, v in closed.items() if k[0] >= oldest}
            closed[self.open_key] = self._open_bucket()
        return History(closed, key, load, load, 1)

    def _open_bucket(self) -> Bucket:
        return Bucket(self.open_sum.scaled(1 / self.open_count), self.open_peak)

    def get(self, key: BucketKey) -> Bucket | None:
        if key == self.open_key:
            return self._open_bucket()
        return self.closed.get(key)


def empty_history() -> History:
    return History({})


def _weekend(ordinal: int) -> bool:
    return datetime.fromordinal(ordinal).weekday() >= 5


def seasonal(history: History, key: BucketKey, config: ForecastConfig, peak: bool = False) -> Load | None:
    """Mean load (or mean peak) at ``key``'s time of day over the earlier days in the history."""
    day, slot = key
    days = range(day - config.history_days, day)
    found = [(d, history.closed[(d, slot)][1 if peak else 0]) for d in days if (d, slot) in history.closed]
    same_kind = [load for d, load in found if _weekend(d) == _weekend(day)]
    loads = same_kind or [load for _, load in found]
    return Load.mean(loads) if loads else None


def trend(history: History, now: datetime, config: ForecastConfig) -> float:
    """Observed over seasonal request rate in the last ``trend_window_s`` (1 when unknown)."""
    observed, expected = 0.0, 0.0
    num = max(1, int(config.trend_window_s // config.bucket_s))
    for i in range(num):
        key = config.key(now - timedelta(seconds=i * config.bucket_s))
        seen, usual = history.get(key), seasonal(history, key, config)
        if seen is None or usual is None:
            continue
        observed += seen.mean.request_rate
        expected += usual.request_rate
    if observed == 0.0 or expected < 1e-9:
        return 1.0
    return min(config.trend_max, max(config.trend_min, observed / expected))


def forecast(history: History, now: datetime, horizon_s: float, config: ForecastConfig, latest: Load,
             peak: bool = False) -> Load:
    """The highest forecast load over [now, now + horizon_s], component by component; with
    ``peak``, of the buckets' peaks (the busiest window expected) rather than their means."""
    factor = trend(history, now, config)
    highest = Load()
    steps = max(1, math.ceil(horizon_s / config.bucket_s))
    for i in range(steps + 1):
        usual = seasonal(history, config.key(now + timedelta(seconds=i * config.bucket_s)), config, peak)
        highest = highest.max(latest if usual is None else usual.scaled(factor))
    return highest
