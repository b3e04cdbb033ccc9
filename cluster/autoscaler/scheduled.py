"""The ``scheduled`` policy: traffic seasons as windows of local time and weekday.

A season is a window (``start`` to ``end``, local time in the schedule's timezone, on the
weekdays in ``days``) with an engine profile and replica bounds. The first season whose
window holds the observation's time wins; when none does, ``default`` applies. A window
whose ``end`` is not after its ``start`` runs past midnight, and its ``days`` name the day it
starts on (a Friday 22:00-02:00 window holds Saturday 01:00). Local time comes from zoneinfo,
so a 09:00 window opens at 09:00 on both sides of a DST change.

Alone, the policy runs each season's ``replicas`` (default: its ``max_replicas``, the
season's peak) of its profile. Combined (combined.py), the season sets the profile and the
floor and ceiling, and other policies choose the count between them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kvtide.cluster.autoscaler.observation import (
    Decision,
    Observation,
    Target,
    check_replica_bounds,
)
from kvtide.cluster.autoscaler.registry import register_policy

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _minutes(name: str, value: str) -> int:
    """Minutes after midnight of "HH:MM" (24:00 is the end of the day)."""
    try:
        hours, minutes = (int(part) for part in value.split(":"))
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not a time of day HH:MM") from None
    total = hours * 60 + minutes
    if not (0 <= hours <= 24 and 0 <= minutes < 60 and total <= 24 * 60):
        raise ValueError(f"{name}: {value!r} is not a time of day between 00:00 and 24:00")
    return total


@dataclass(frozen=True)
class Season:
    name: str
    profile: str
    min_replicas: int = 0
    max_replicas: int = 1
    replicas: int | None = None
    """What ``scheduled`` alone runs; None: ``max_replicas``."""
    days: tuple[str, ...] = DAYS
    start: str = "00:00"
    """Local time the window opens, HH:MM."""
    end: str = "24:00"
    """Local time it closes (exclusive), HH:MM; not after ``start``: past midnight."""
    extra_replicas: Mapping[str, int] = field(default_factory=dict)
    """Replicas of other profiles that run through the season at a fixed count (say, one
    long-context replica beside a fleet sized for shorter requests)."""

    def __post_init__(self) -> None:
        check_replica_bounds(self.min_replicas, self.max_replicas)
        if self.replicas is not None and not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(
                f"replicas: {self.replicas} is outside [min_replicas {self.min_replicas}, max_replicas {self.max_replicas}]"
            )
        for day in self.days:
            if day not in DAYS:
                raise ValueError(f"days: {day!r} is not one of {', '.join(DAYS)}")
        if not self.days:
            raise ValueError("days: must name at least one day")
        start, end = _minutes("start", self.start), _minutes("end", self.end)
        if start == end or (start == 0 and end == 0):
            raise ValueError(f"end: {self.end!r} equals start {self.start!r}; a window must have a length")
        for profile, n in self.extra_replicas.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"extra_replicas.{profile}: {n!r} must be an int >= 0")
        if self.profile in self.extra_replicas:
            raise ValueError(f"extra_replicas.{self.profile}: names the season's own profile")
        object.__setattr__(self, "days", tuple(self.days))
        object.__setattr__(self, "extra_replicas", MappingProxyType(dict(self.extra_replicas)))

    @property
    def start_minute(self) -> int:
        """Minutes after local midnight at which the window opens."""
        return _minutes("start", self.start)

    @property
    def end_minute(self) -> int:
        return _minutes("end", self.end)

    def contains(self, local: datetime) -> bool:
        """Whether the window holds ``local`` (a time in the schedule's timezone)."""
        start, end = self.start_minute, self.end_minute
        minute = local.hour * 60 + local.minute
        today, yesterday = DAYS[local.weekday()], DAYS[(local.weekday() - 1) % 7]
        if start < end:
            return today in self.days and start <= minute < end
        return (today in self.days and minute >= start) or (yesterday in self.days and minute < end)

    def target(self, count: int, why: str) -> Target:
        return Target({self.profile: count, **self.extra_replicas}, f"season {self.name!r}: {why}")


@dataclass(frozen=True)
class ScheduledConfig:
    timezone: str
    default: Season
    """The season when no window holds the time."""
    seasons: tuple[Season, ...] = ()

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone: {self.timezone!r} is not an IANA timezone (e.g. Europe/Paris)") from None
        names = [s.name for s in (self.default, *self.seasons)]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"seasons[{i - 1}].name: {name!r} is used twice")
        object.__setattr__(self, "seasons", tuple(self.seasons))

    def season_at(self, when: datetime) -> tuple[Season, datetime]:
        """The season in force at ``when`` (aware) and ``when`` in the schedule's timezone."""
        local = when.astimezone(ZoneInfo(self.timezone))
        for season in self.seasons:
            if season.contains(local):
                return season, local
        return self.default, local

    def describe_time(self, local: datetime) -> str:
        return f"{DAYS[local.weekday()]} {local:%H:%M} {self.timezone}"


@register_policy("scheduled")
class ScheduledPolicy:
    name = "scheduled"

    def __init__(self, config) -> None:
        if config.scheduled is None:
            raise ValueError("scheduled: the section is missing; the scheduled policy needs its seasons")
        self.schedule: ScheduledConfig = config.scheduled

    def initial_state(self) -> None:
        return None

    def decide(self, obs: Observation, state: None) -> Decision:
        season, local = self.schedule.season_at(obs.time)
        count = season.max_replicas if season.replicas is None else season.replicas
        return Decision(season.target(count, f"{self.schedule.describe_time(local)}, fixed {count}"), None)
