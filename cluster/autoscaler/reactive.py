"""The ``reactive`` policy: scale on queue, KV pressure and SLO breach, without flapping.

Each observation is one of three pressures (``assess``):

- **up** when any signal is past its up threshold: waiting requests per ready replica above
  ``queue_up``, KV usage above ``kv_usage_up``, TTFT or ITL p90 above ``slo_up`` x its SLO;
- **down** when every signal is below its down threshold (``queue_down``, ``kv_usage_down``,
  ``slo_down`` x the SLO; no latency sample counts as below);
- **hold** in between. The gap between the up and down thresholds is the hysteresis: noise
  that moves a signal inside the gap changes nothing.

Up adds ``max(1, ceil(step_up * current))`` replicas once ``up_cooldown_s`` has passed since
the last change and no replica of the fleet is still starting (their capacity is on its way:
adding more for the same breach overshoots). Down removes ``max(1, ceil(step_down *
current))`` once ``down_cooldown_s`` has passed since the last change in either direction.
The state is the last change's time and direction, and (combined.py) the level reactive
last asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from kvtide.cluster.autoscaler.observation import (
    Decision,
    Observation,
    Target,
    check_replica_bounds,
)
from kvtide.cluster.autoscaler.registry import register_policy


@dataclass(frozen=True)
class SloConfig:
    ttft_p90_s: float
    """Time to first token, 90th percentile over a window."""
    itl_p90_s: float
    """Inter-token latency, 90th percentile of tokens over a window."""

    def __post_init__(self) -> None:
        for name in ("ttft_p90_s", "itl_p90_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: {value} must be a finite number > 0")


@dataclass(frozen=True)
class ReactiveConfig:
    profile: str | None = None
    """The profile it scales alone; combined with ``scheduled``, the season's."""
    min_replicas: int = 1
    max_replicas: int = 64
    queue_up: float = 2.0
    queue_down: float = 0.25
    kv_usage_up: float = 0.9
    kv_usage_down: float = 0.6
    slo_up: float = 1.0
    slo_down: float = 0.5
    step_up: float = 0.25
    step_down: float = 0.0
    up_cooldown_s: float = 60.0
    down_cooldown_s: float = 300.0

    def __post_init__(self) -> None:
        check_replica_bounds(self.min_replicas, self.max_replicas)
        for low, high in (("queue_down", "queue_up"), ("kv_usage_down", "kv_usage_up"), ("slo_down", "slo_up")):
            lo, hi = getattr(self, low), getattr(self, high)
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
                raise ValueError(f"{low}: {lo} must be >= 0 and below {high} {hi} (the gap is the hysteresis)")
        if self.kv_usage_up > 1:
            raise ValueError(f"kv_usage_up: {self.kv_usage_up} is above 1")
        for name in ("step_up", "step_down", "up_cooldown_s", "down_cooldown_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: {value} must be a finite number >= 0")


@dataclass(frozen=True)
class ReactiveState:
    last_change: datetime | None = None
    last_direction: int = 0
    """+1 up, -1 down, 0 never changed."""
    level: int | None = None
    """Combined with other policies: the count reactive holds up (None: not yet set)."""

    def changed(self, when: datetime, before: int, after: int, level: int | None = None) -> ReactiveState:
        """The state after the fleet went from ``before`` to ``after`` replicas at ``when``."""
        if after == before:
            return ReactiveState(self.last_change, self.last_direction, level)
        return ReactiveState(when, 1 if after > before else -1, level)


class Pressure(NamedTuple):
    direction: int
    """+1 up, -1 down, 0 hold."""
    why: str


def assess(obs: Observation, config: ReactiveConfig, slo: SloConfig) -> Pressure:
    ready = max(1, obs.num_ready)
    queue = obs.queue_depth / ready
    ttft = obs.ttft_s.p90 if obs.ttft_s else None
    itl = obs.itl_s.p90 if obs.itl_s else None
    up = []
    if queue > config.queue_up:
        up.append(f"queue {queue:.2f}/replica > {config.queue_up:g}")
    if obs.kv_usage > config.kv_usage_up:
        up.append(f"KV usage {obs.kv_usage:.0%} > {config.kv_usage_up:.0%}")
    if ttft is not None and ttft > config.slo_up * slo.ttft_p90_s:
        up.append(f"TTFT p90 {ttft:.2f} s > {config.slo_up:g} x SLO {slo.ttft_p90_s:g} s")
    if itl is not None and itl > config.slo_up * slo.itl_p90_s:
        up.append(f"ITL p90 {itl * 1e3:.0f} ms > {config.slo_up:g} x SLO {slo.itl_p90_s * 1e3:.0f} ms")
    if up:
        return Pressure(1, "; ".join(up))
    calm = (
        queue <= config.queue_down
        and obs.kv_usage <= config.kv_usage_down
        and (ttft is None or ttft <= config.slo_down * slo.ttft_p90_s)
        and (itl is None or itl <= config.slo_down * slo.itl_p90_s)
    )
    summary = (f"queue {queue:.2f}/replica, KV {obs.kv_usage:.0%}, TTFT p90 "
               f"{'-' if ttft is None else f'{ttft:.2f} s'}, ITL p90 {'-' if itl is None else f'{itl * 1e3:.0f} ms'}")
    return Pressure(-1, f"calm: {summary}") if calm else Pressure(0, f"within hysteresis: {summary}")


def _since(obs: Observation, state: ReactiveState) -> float:
    return math.inf if state.last_change is None else (obs.time - state.last_change).total_seconds()


def up_step(obs: Observation, state: ReactiveState, config: ReactiveConfig, current: int) -> tuple[int, str]:
    """Replicas to add now under up pressure (0 while cooling down or while replicas start)."""
    if sum(obs.starting.values()):
        return 0, f"{sum(obs.starting.values())} replicas still starting"
    since = _since(obs, state)
    if since < config.up_cooldown_s:
        return 0, f"up cooldown ({since:.0f} s < {config.up_cooldown_s:g} s)"
    return max(1, math.ceil(config.step_up * current)), "scale up"


def down_allowed(obs: Observation, state: ReactiveState, config: ReactiveConfig) -> tuple[bool, str]:
    since = _since(obs, state)
    if since < config.down_cooldown_s:
        return False, f"down cooldown ({since:.0f} s < {config.down_cooldown_s:g} s)"
    return True, "scale down"


def down_step(config: ReactiveConfig, current: int) -> int:
    return max(1, math.ceil(config.step_down * current))


@register_policy("reactive")
class ReactivePolicy:
    name = "reactive"

    def __init__(self, config) -> None:
        self.settings: ReactiveConfig = config.reactive or ReactiveConfig()
        self.slo: SloConfig = config.slo
        if self.settings.profile is None:
            raise ValueError("reactive.profile: missing; alone, the reactive policy needs the profile it scales")

    def initial_state(self) -> ReactiveState:
        return ReactiveState()

    def decide(self, obs: Observation, state: ReactiveState) -> Decision:
        s, profile = self.settings, self.settings.profile
        current = obs.replicas.get(profile, 0)
        pressure = assess(obs, s, self.slo)
        count, action = current, "hold"
        if pressure.direction > 0:
            step, action = up_step(obs, state, s, current)
            count = current + step
        elif pressure.direction < 0:
            allowed, action = down_allowed(obs, state, s)
            count = current - down_step(s, current) if allowed else current
        count = min(s.max_replicas, max(s.min_replicas, count))
        reason = f"{pressure.why}; {action}: {current} -> {count}"
        return Decision(Target({profile: count}, reason), state.changed(obs.time, current, count))
