"""The ``predictive`` and ``scale_to_zero`` policies.

``predictive`` forecasts the load of the coming window (forecast.py: the same time of day on
earlier days, times the recent trend), highest over the cold start plus ``horizon_s``, by
default of the buckets' busiest minutes (``size_for: peak``), and sizes the fleet by the
measured capacity of one replica of the profile:

    replicas = ceil(capacity.busy_fraction(prefill tok/s, decode tok/s) / target_utilization)

Combined with ``scheduled``, a season's extra replicas of other profiles serve their share of
the same load, so the count of the season's profile is less what they stand in for (each
extra of profile Q counts as busy_fraction / Q's busy_fraction of the same load).

``scale_to_zero`` runs ``replicas`` while there is traffic and none after ``idle_s`` without
any, unless the forecast says traffic returns within the cold start (plus ``margin_s``): a
replica asked for when the first request arrives would come too late for it. A queued
request always wakes the fleet.

Both keep their history in their state (``ForecastState``), so one observation feeds both
when they are combined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from kvtide.cluster.autoscaler.forecast import History, Load, empty_history, forecast
from kvtide.cluster.autoscaler.observation import (
    Decision,
    Observation,
    Target,
    check_replica_bounds,
)
from kvtide.cluster.autoscaler.registry import register_policy


@dataclass(frozen=True)
class PredictiveConfig:
    profile: str | None = None
    """The profile it sizes alone; combined with ``scheduled``, the season's."""
    min_replicas: int = 1
    max_replicas: int = 64
    target_utilization: float = 0.6
    """Busy fraction of a replica to size for; the rest absorbs bursts and keeps queues short."""
    horizon_s: float = 600.0
    """How far past the cold start the forecast looks (its peak over the span sizes the fleet)."""
    size_for: str = "peak"
    """peak: the busiest observation window (minute) expected in each history bucket, since a
    fleet cannot start replicas within a burst; mean: the bucket's mean load."""
    down_stabilization_s: float = 0.0
    """Size for the highest count of this long a past too (Kubernetes HPA's scale-down
    stabilization): one quiet forecast does not drop replicas the next burst needs."""

    def __post_init__(self) -> None:
        check_replica_bounds(self.min_replicas, self.max_replicas)
        if self.size_for not in ("peak", "mean"):
            raise ValueError(f"size_for: {self.size_for!r} is not one of peak, mean")
        if not 0 < self.target_utilization <= 1:
            raise ValueError(f"target_utilization: {self.target_utilization} must be in (0, 1]")
        for name in ("horizon_s", "down_stabilization_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: {value} must be a finite number >= 0")


@dataclass(frozen=True)
class ScaleToZeroConfig:
    profile: str | None = None
    replicas: int = 1
    """What ``scale_to_zero`` alone runs while there is traffic."""
    idle_s: float = 600.0
    """Seconds without arrivals before the fleet may go to zero."""
    margin_s: float = 60.0
    """Added to the cold start: the forecast must stay quiet this much longer."""
    min_rate: float = 0.001
    """Forecast requests per second at or below which traffic counts as absent."""

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"replicas: {self.replicas!r} must be an int >= 1")
        for name in ("idle_s", "margin_s", "min_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: {value} must be a finite number >= 0")


@dataclass(frozen=True)
class ForecastState:
    history: History
    last_active: datetime | None = None
    """The last observation with arrivals or a queue; before any, the first observation
    (idle time counts from what the policy has seen)."""
    recent: tuple[tuple[datetime, int], ...] = ()
    """The forecast counts of the last ``down_stabilization_s``."""


def observe(state: ForecastState, obs: Observation, config) -> ForecastState:
    history = state.history.observe(config.forecast.key(obs.time), Load.of(obs), config.forecast.history_days)
    active = obs.request_rate > 0 or obs.queue_depth > 0 or state.last_active is None
    return replace(state, history=history, last_active=obs.time if active else state.last_active)


def zero_allowed(obs: Observation, state: ForecastState, config) -> tuple[bool, str]:
    """Whether the fleet may be at zero now, and why (or why not)."""
    stz: ScaleToZeroConfig = config.scale_to_zero or ScaleToZeroConfig()
    if obs.queue_depth > 0:
        return False, f"{obs.queue_depth} requests queued"
    idle = (obs.time - state.last_active).total_seconds() if state.last_active is not None else 0.0
    if idle < stz.idle_s:
        return False, f"idle {idle:.0f} s < idle_s {stz.idle_s:g}"
    lookahead = obs.cold_start_s + stz.margin_s
    peak = forecast(state.history, obs.time, lookahead, config.forecast, Load.of(obs))
    if peak.request_rate > stz.min_rate:
        return False, (f"forecast {peak.request_rate:.3g} req/s within cold start {obs.cold_start_s:g} s + "
                       f"margin {stz.margin_s:g} s")
    return True, f"idle, forecast {peak.request_rate:.3g} req/s over the next {lookahead:g} s"


class Predictor:
    """Replicas of a profile for the forecast load; shared by ``predictive`` and ``combined``."""

    def __init__(self, config, profiles: list[str]) -> None:
        """``profiles``: those it may be asked to size; each needs a measured capacity."""
        self.config = config
        self.settings: PredictiveConfig = config.predictive or PredictiveConfig()
        for profile in profiles:
            if config.profiles[profile].capacity is None:
                raise ValueError(f"profiles.{profile}.capacity: missing; the predictive policy sizes replicas by it")

    def size(self, obs: Observation, state: ForecastState, profile: str,
             alongside: Mapping[str, int] | None = None) -> tuple[int, ForecastState, str]:
        """``replicas_needed``, the highest over the last ``down_stabilization_s``."""
        n, why = self.replicas_needed(obs, state, profile, alongside)
        window = self.settings.down_stabilization_s
        recent = tuple((t, c) for t, c in state.recent if (obs.time - t).total_seconds() < window) + ((obs.time, n),)
        held = max(c for _, c in recent)
        if held > n:
            why += f"; {held} held for {window:g} s"
        return held, replace(state, recent=recent if window > 0 else ()), why

    def replicas_needed(self, obs: Observation, state: ForecastState, profile: str,
                        alongside: Mapping[str, int] | None = None) -> tuple[int, str]:
        """Replicas of ``profile`` for the forecast load, less what the replicas ``alongside``
        (other profiles running beside it, such as a season's extras) serve of it."""
        capacity = self.config.profiles[profile].capacity
        peak = forecast(state.history, obs.time, obs.cold_start_s + self.settings.horizon_s, self.config.forecast,
                        Load.of(obs), peak=self.settings.size_for == "peak")
        busy = capacity.busy_fraction(peak.prefill_tokens_per_s, peak.decode_tokens_per_s)
        covered, shares = alongside_share(self.config, busy, peak, alongside or {})
        n = max(0, math.ceil(busy / self.settings.target_utilization - covered - 1e-9))
        why = (f"forecast {self.settings.size_for} {peak.request_rate:.2f} req/s, {peak.prefill_tokens_per_s:.0f} prompt + "
               f"{peak.decode_tokens_per_s:.0f} output tok/s = {busy:.2f} replicas busy")
        if shares:
            why += f"; {covered:.2f} of the {busy / self.settings.target_utilization:.2f} needed served by {shares}"
        return n, why


def alongside_share(config, busy: float, load: Load, alongside: Mapping[str, int]) -> tuple[float, str]:
    """How many replicas of the sized profile (whose busy fraction on ``load`` is ``busy``)
    the replicas ``alongside`` stand in for: the router sends them their share of the same
    requests, so a replica of profile Q serves as much as ``busy / busy_Q`` of the sized one.
    A profile without a measured capacity counts for nothing (it is not known to serve any)."""
    covered, parts = 0.0, []
    for name, count in alongside.items():
        q = config.profiles[name].capacity
        if count <= 0 or q is None or busy <= 0:
            continue
        equivalent = count * busy / q.busy_fraction(load.prefill_tokens_per_s, load.decode_tokens_per_s)
        covered += equivalent
        parts.append(f"{count} {name}")
    return covered, ", ".join(parts)


@register_policy("predictive")
class PredictivePolicy:
    name = "predictive"

    def __init__(self, config) -> None:
        s = config.predictive or PredictiveConfig()
        if s.profile is None:
            raise ValueError("predictive.profile: missing; alone, the predictive policy needs the profile it sizes")
        self.profile = s.profile
        self.predictor = Predictor(config, [s.profile])

    def initial_state(self) -> ForecastState:
        return ForecastState(empty_history())

    def decide(self, obs: Observation, state: ForecastState) -> Decision:
        state = observe(state, obs, self.predictor.config)
        s = self.predictor.settings
        n, state, why = self.predictor.size(obs, state, self.profile)
        count = min(s.max_replicas, max(s.min_replicas, n))
        return Decision(Target({self.profile: count}, f"{why}; {count} in [{s.min_replicas}, {s.max_replicas}]"), state)


@register_policy("scale_to_zero")
class ScaleToZeroPolicy:
    name = "scale_to_zero"

    def __init__(self, config) -> None:
        self.config = config
        self.settings: ScaleToZeroConfig = config.scale_to_zero or ScaleToZeroConfig()
        if self.settings.profile is None:
            raise ValueError("scale_to_zero.profile: missing; alone, the scale_to_zero policy needs a profile")

    def initial_state(self) -> ForecastState:
        return ForecastState(empty_history())

    def decide(self, obs: Observation, state: ForecastState) -> Decision:
        state = observe(state, obs, self.config)
        allowed, why = zero_allowed(obs, state, self.config)
        count = 0 if allowed else self.settings.replicas
        return Decision(Target({self.settings.profile: count}, ("to zero: " if allowed else "stay up: ") + why), state)
