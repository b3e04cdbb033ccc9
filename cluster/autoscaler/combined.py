"""Policies combined: ``scheduled + predictive + reactive + scale_to_zero`` (any two or more).

The combination rule, in order:

1. **Season** (``scheduled``): the season in force names the profile P, the floor and the
   ceiling, and the extra replicas of other profiles. Without ``scheduled``, P and the bounds
   come from the ``predictive`` section (else ``reactive``, else ``scale_to_zero``).
2. **Current** count: replicas of P; when there are none (the season just turned), every
   replica less the season's extras, since those are the fleet that rolls to P.
3. **Base** count: ``predictive``'s forecast count for P, less the replicas of P the season's
   extras stand in for: the router sends them their share of the same requests, so sizing P
   for the whole load as well would count their capacity as headroom a second time. Without
   ``predictive``: the current count when ``reactive`` is there, else the season's ``replicas``.
4. **Correction** (``reactive``): reactive keeps a level, starting at the current count. Up
   pressure raises it to current + its step (its cooldowns and starting-replica rule
   apply); calm lowers it by its down step once ``down_cooldown_s`` has passed since the
   last change; in its hysteresis band it holds. The count is the level (without
   ``predictive``) or max(base, level): reactive never pulls the count below the forecast,
   and what it added on a breach stays until the signals are calm, so the forecast cannot
   take it back at once and flap the fleet. Any decrease also waits ``down_cooldown_s``
   after the last change.
5. **Bounds**: clamp to [floor, ceiling].
6. **Zero**: the count may reach 0 only through ``scale_to_zero`` (a floor of 0 and
   ``zero_allowed``: idle long enough, no queue, no traffic forecast within the cold start);
   otherwise it is at least 1.

The state holds the forecast history (shared by ``predictive`` and ``scale_to_zero``) and the
reactive state (the last change of the fleet, whichever part caused it).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtide.cluster.autoscaler.forecast import empty_history
from kvtide.cluster.autoscaler.observation import Decision, Observation, Target
from kvtide.cluster.autoscaler.predictive import (
    ForecastState,
    Predictor,
    ScaleToZeroConfig,
    observe,
    zero_allowed,
)
from kvtide.cluster.autoscaler.reactive import (
    ReactiveConfig,
    ReactiveState,
    assess,
    down_allowed,
    down_step,
    up_step,
)

COMBINABLE = ("scheduled", "predictive", "reactive", "scale_to_zero")


@dataclass(frozen=True)
class CombinedState:
    forecast: ForecastState
    reactive: ReactiveState


class CombinedPolicy:
    def __init__(self, names: tuple[str, ...], config) -> None:
        for name in names:
            if name not in COMBINABLE:
                raise ValueError(f"autoscaling policy {name!r} does not combine; combinable: {', '.join(COMBINABLE)}")
        self.name = " + ".join(names)
        self.parts = frozenset(names)
        self.config = config
        if "scheduled" in self.parts and config.scheduled is None:
            raise ValueError("scheduled: the section is missing; the scheduled policy needs its seasons")
        self.reactive: ReactiveConfig = config.reactive or ReactiveConfig()
        if "scheduled" in self.parts:
            sized = [s.profile for s in (config.scheduled.default, *config.scheduled.seasons)]
        else:
            section = getattr(config, self._bounds_section())
            if section is None or section.profile is None:
                raise ValueError(f"{self._bounds_section()}.profile: missing; without scheduled it names the profile")
            sized = [section.profile]
        self.predictor = Predictor(config, list(dict.fromkeys(sized))) if "predictive" in self.parts else None

    def _bounds_section(self) -> str:
        """Without ``scheduled``: the section that names the profile and bounds."""
        return next(n for n in ("predictive", "reactive", "scale_to_zero") if n in self.parts)

    def initial_state(self) -> CombinedState:
        return CombinedState(ForecastState(empty_history()), ReactiveState())

    def _season(self, obs: Observation) -> tuple[str, int, int, int | None, dict[str, int], str]:
        """(profile, floor, ceiling, the season's fixed count, extras, reason prefix)."""
        if "scheduled" in self.parts:
            season, local = self.config.scheduled.season_at(obs.time)
            count = season.max_replicas if season.replicas is None else season.replicas
            where = f"season {season.name!r} ({self.config.scheduled.describe_time(local)})"
            return season.profile, season.min_replicas, season.max_replicas, count, dict(season.extra_replicas), where
        section = getattr(self.config, self._bounds_section())
        if isinstance(section, ScaleToZeroConfig):
            return section.profile, 0, section.replicas, section.replicas, {}, "no season"
        return section.profile, section.min_replicas, section.max_replicas, None, {}, "no season"

    def decide(self, obs: Observation, state: CombinedState) -> Decision:
        profile, floor, ceiling, fixed, extras, where = self._season(obs)
        forecast_state = observe(state.forecast, obs, self.config)
        extra_now = sum(min(n, obs.replicas.get(p, 0)) for p, n in extras.items())
        current = obs.replicas.get(profile, 0) or max(0, obs.num_replicas - extra_now)
        why = [where]
        if self.predictor is not None:
            base, forecast_state, text = self.predictor.size(obs, forecast_state, profile, extras)
            why.append(f"predictive {base} ({text})")
        elif "reactive" in self.parts or fixed is None:
            base = current
        else:
            base = fixed
        count, level = base, None
        if "reactive" in self.parts:
            level = current if state.reactive.level is None else state.reactive.level
            pressure = assess(obs, self.reactive, self.config.slo)
            if pressure.direction > 0:
                step, action = up_step(obs, state.reactive, self.reactive, current)
                if step:
                    level = max(level, current) + step
                why.append(f"reactive up ({pressure.why}): {action}")
            elif pressure.direction < 0:
                allowed, action = down_allowed(obs, state.reactive, self.reactive)
                if allowed:
                    level = max(0, level - down_step(self.reactive, level))
                why.append(f"reactive {action} ({pressure.why})")
            count = level if self.predictor is None else max(base, level)
            if count < current:
                allowed, action = down_allowed(obs, state.reactive, self.reactive)
                if not allowed:
                    count = current
                    why.append(f"hold: {action}")
        count = min(ceiling, max(floor, count))
        if count == 0:
            allowed, text = (zero_allowed(obs, forecast_state, self.config) if "scale_to_zero" in self.parts
                             else (False, "scale_to_zero is not in the policy"))
            if not allowed and ceiling > 0:
                count = 1
            why.append(("to zero: " if allowed else "stay up: ") + text)
        why.append(f"{current} -> {count} in [{floor}, {ceiling}]")
        target = Target({profile: count, **extras}, "; ".join(why))
        if level is not None:
            level = min(max(level, floor), ceiling)
        reactive = state.reactive.changed(obs.time, current, count, level)
        return Decision(target, CombinedState(forecast_state, reactive))
