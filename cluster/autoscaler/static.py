"""The ``static`` policy: a fixed number of replicas of one profile, whatever the traffic.

The baseline the others are priced against (provisioning for the peak all day)."""

from __future__ import annotations

from dataclasses import dataclass

from kvtide.cluster.autoscaler.observation import Decision, Observation, Target
from kvtide.cluster.autoscaler.registry import register_policy


@dataclass(frozen=True)
class StaticConfig:
    profile: str
    replicas: int

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or isinstance(self.replicas, bool) or self.replicas < 0:
            raise ValueError(f"replicas: {self.replicas!r} must be an int >= 0")


@register_policy("static")
class StaticPolicy:
    name = "static"

    def __init__(self, config) -> None:
        if config.static is None:
            raise ValueError("static: the section is missing; the static policy needs its profile and replicas")
        self.settings: StaticConfig = config.static

    def initial_state(self) -> None:
        return None

    def decide(self, obs: Observation, state: None) -> Decision:
        s = self.settings
        return Decision(Target({s.profile: s.replicas}, f"static: {s.replicas} replicas of {s.profile}"), None)
