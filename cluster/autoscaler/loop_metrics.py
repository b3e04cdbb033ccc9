"""The control loop's metrics, on the frontend's registry (its ``/metrics``).

- ``kvtide:autoscaler_target_replicas{profile}``: the last decision's target;
- ``kvtide:autoscaler_replicas{profile, state}``: the fleet as the loop saw it (starting,
  ready, draining);
- ``kvtide:autoscaler_decisions_total{action}``: decisions by what they did (up, down, roll,
  hold);
- ``kvtide:autoscaler_errors_total``: ticks that failed (logged; retried the next tick).
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter, Gauge

from kvtide.cluster.autoscaler.actions import ReplicaView
from kvtide.cluster.autoscaler.observation import Target

ACTIONS = ("up", "down", "roll", "hold")
STATES = ("starting", "ready", "draining")


class LoopMetrics:
    def __init__(self, registry) -> None:
        self.target = Gauge("kvtide:autoscaler_target_replicas", "Replicas the autoscaler's last decision wants, "
                            "per engine profile.", ["profile"], registry=registry)  # fmt: skip
        self.replicas = Gauge("kvtide:autoscaler_replicas", "Replicas per engine profile and state (starting, "
                              "ready, draining) when the autoscaler last decided.", ["profile", "state"],
                              registry=registry)  # fmt: skip
        self.decisions = Counter("kvtide:autoscaler_decisions", "Autoscaler decisions by action: up, down, roll "
                                 "(the profile changes), hold.", ["action"], registry=registry)  # fmt: skip
        self.errors = Counter("kvtide:autoscaler_errors", "Autoscaler ticks that failed (retried the next tick).",
                              registry=registry)  # fmt: skip
        for action in ACTIONS:
            self.decisions.labels(action)  # every action is exported from the start, at 0
        self._profiles: set[str] = set()

    def decided(self, target: Target, action: str, views: Sequence[ReplicaView]) -> None:
        self.decisions.labels(action).inc()
        self._profiles |= set(target.replicas) | {v.profile for v in views}
        for profile in sorted(self._profiles):
            self.target.labels(profile).set(target.replicas.get(profile, 0))
            for state in STATES:
                n = sum(1 for v in views if v.profile == profile and v.state == state)
                self.replicas.labels(profile, state).set(n)
