"""The autoscale config (``kvtide serve --autoscale FILE``): YAML into frozen dataclasses.

Top-level keys (``example_autoscale.yaml`` shows them all):

- ``policy``: a registered policy or a combination, ``"scheduled + reactive + predictive"``;
- ``timezone`` (IANA name, default UTC): seasons' windows and the forecast's days are local to it;
- ``control_interval_s``, ``window_s``: how often the loop decides, over how long a window;
- ``cold_start_s``: the expected seconds from asking for a replica to its first request,
  until the loop has measured one;
- ``slo``: ``ttft_p90_s`` and ``itl_p90_s``;
- ``profiles``: engine profiles by name (profile.py's fields);
- one section per policy that the ``policy`` names: ``scheduled`` (``default`` season and
  ``seasons``), ``reactive``, ``predictive``, ``scale_to_zero``, ``static``; and
  ``forecast`` (history buckets and trend, forecast.py).

Every error names the field's path, the value and the limit; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kvtide.cluster.autoscaler.forecast import ForecastConfig
from kvtide.cluster.autoscaler.predictive import PredictiveConfig, ScaleToZeroConfig
from kvtide.cluster.autoscaler.profile import EngineProfile
from kvtide.cluster.autoscaler.reactive import ReactiveConfig, SloConfig
from kvtide.cluster.autoscaler.registry import parse_policy_spec
from kvtide.cluster.autoscaler.scheduled import ScheduledConfig, Season
from kvtide.cluster.autoscaler.schema import build, check_keys, where
from kvtide.cluster.autoscaler.static import StaticConfig


@dataclass(frozen=True)
class AutoscaleConfig:
    policy: str
    slo: SloConfig
    profiles: Mapping[str, EngineProfile]
    timezone: str = "UTC"
    control_interval_s: float = 30.0
    window_s: float = 60.0
    cold_start_s: float = 120.0
    scheduled: ScheduledConfig | None = None
    reactive: ReactiveConfig | None = None
    predictive: PredictiveConfig | None = None
    scale_to_zero: ScaleToZeroConfig | None = None
    static: StaticConfig | None = None
    forecast: ForecastConfig = field(default_factory=ForecastConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "profiles", MappingProxyType(dict(self.profiles)))
        for name in ("control_interval_s", "window_s", "cold_start_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: {value} must be a finite number > 0")
        if self.window_s < self.control_interval_s:
            raise ValueError(f"window_s: {self.window_s} is below control_interval_s {self.control_interval_s}")
        if not self.profiles:
            raise ValueError("profiles: at least one engine profile is needed")
        try:
            names = parse_policy_spec(self.policy)
        except ValueError as exc:
            raise ValueError(f"policy: {exc}") from None
        for name in names:
            if getattr(self, name, None) is None and name in ("scheduled", "static"):
                raise ValueError(f"{name}: missing; policy {self.policy!r} needs this section")
        if "scheduled" not in names and "static" not in names:
            # Without seasons the profile (and bounds) come from the first of these sections.
            first = next(n for n in ("predictive", "reactive", "scale_to_zero") if n in names)
            section = getattr(self, first)
            if section is None or section.profile is None:
                raise ValueError(f"{first}.profile: missing; without scheduled, policy {self.policy!r} "
                                 "scales the profile named here")
        for path, profile in self.profile_references():
            if profile not in self.profiles:
                raise ValueError(f"{path}: {profile!r} is not in profiles ({', '.join(self.profiles)})")

    @property
    def policy_names(self) -> tuple[str, ...]:
        return parse_policy_spec(self.policy)

    def profile_references(self) -> list[tuple[str, str]]:
        """(path, profile name) of every place the config names a profile."""
        refs: list[tuple[str, str]] = []
        if self.scheduled is not None:
            for path, season in [("scheduled.default", self.scheduled.default),
                                 *((f"scheduled.seasons[{i}]", s) for i, s in enumerate(self.scheduled.seasons))]:
                refs.append((f"{path}.profile", season.profile))
                refs.extend((f"{path}.extra_replicas.{p}", p) for p in season.extra_replicas)
        for name in ("reactive", "predictive", "scale_to_zero", "static"):
            section = getattr(self, name)
            if section is not None and section.profile is not None:
                refs.append((f"{name}.profile", section.profile))
        return refs


def _profiles(data: Any, path: str) -> dict[str, EngineProfile]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping of profile name to profile, got {data!r}")
    return {str(name): build(EngineProfile, spec, where(path, str(name)), fixed={"name": str(name)})
            for name, spec in data.items()}


def _season(data: Any, path: str, *, default: bool = False) -> Season:
    return build(Season, data, path, fixed={"name": "default"} if default else None)


def _scheduled(timezone: str):
    def parse(data: Any, path: str) -> ScheduledConfig:
        data = check_keys(data, path, ["default", "seasons"], ["default"])
        seasons = data.get("seasons", [])
        if not isinstance(seasons, list):
            raise ValueError(f"{path}.seasons: expected a list of seasons, got {seasons!r}")
        default = _season(data["default"], f"{path}.default", default=True)
        parsed = tuple(_season(s, f"{path}.seasons[{i}]") for i, s in enumerate(seasons))
        try:
            return ScheduledConfig(timezone, default, parsed)
        except ValueError as exc:
            # The timezone is a top-level key; the other errors name a season.
            raise ValueError(str(exc) if str(exc).startswith("timezone") else f"{path}.{exc}") from None
    return parse


def parse_config(data: Any) -> AutoscaleConfig:
    """An ``AutoscaleConfig`` from parsed YAML (a mapping)."""
    data = check_keys(data, "", [f for f in AutoscaleConfig.__dataclass_fields__], ["policy", "slo", "profiles"])
    timezone = data.get("timezone", "UTC")
    if not isinstance(timezone, str):
        raise ValueError(f"timezone: expected an IANA timezone name, got {timezone!r}")
    custom = {
        "profiles": _profiles,
        "scheduled": _scheduled(timezone),
        "forecast": lambda d, p: build(ForecastConfig, d, p, fixed={"timezone": timezone}),
    }
    config = build(AutoscaleConfig, data, "", custom=custom)
    if "forecast" not in data:
        config = dataclasses.replace(config, forecast=ForecastConfig(timezone=timezone))
    return config


def load_config(path: str | Path) -> AutoscaleConfig:
    """Read and validate an autoscale YAML file; errors start with the file's name."""
    import yaml

    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    try:
        return parse_config(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
