"""From a target to actions on the fleet: start, cancel, undrain and drain replicas.

Rules (``plan_actions``), per profile, comparing the target with the replicas that serve or
will (ready plus starting; draining ones do not count):

- too few: undrain draining replicas of the profile first (no cold start), then start new;
- too many: cancel starting replicas first (newest first: they are furthest from ready),
  then drain ready ones, least loaded first (they finish soonest);
- **make before break**: drains never take the fleet's ready replicas below the target's
  total. When a season rolls the fleet from one profile to another, the old replicas drain
  only as the new ones become ready, so capacity never drops below the policy's floor (the
  target is at least the floor), and nothing in flight is lost: a draining replica takes
  no new request and stops when its last one finishes.

Pure: the caller applies the actions (Ray in the control loop, the fleet simulator here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from kvtide.cluster.autoscaler.observation import Target

ReplicaState = Literal["starting", "ready", "draining"]


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    profile: str
    state: ReplicaState
    num_in_flight: int = 0
    started_s: float = 0.0
    """When it was asked for (orders cancels: newest first)."""


@dataclass(frozen=True)
class Actions:
    start: Mapping[str, int] = field(default_factory=dict)
    """New replicas per profile."""
    cancel: tuple[str, ...] = ()
    """Starting replicas to stop before they serve."""
    undrain: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (any(self.start.values()) or self.cancel or self.undrain or self.drain)


def counts(replicas: Sequence[ReplicaView]) -> tuple[dict[str, int], dict[str, int]]:
    """(serving or starting, starting) per profile: an ``Observation``'s ``replicas`` and ``starting``."""
    serving: dict[str, int] = {}
    starting: dict[str, int] = {}
    for r in replicas:
        if r.state != "draining":
            serving[r.profile] = serving.get(r.profile, 0) + 1
        if r.state == "starting":
            starting[r.profile] = starting.get(r.profile, 0) + 1
    return serving, starting


def plan_actions(replicas: Sequence[ReplicaView], target: Target) -> Actions:
    start: dict[str, int] = {}
    cancel: list[str] = []
    undrain: list[str] = []
    surplus: list[ReplicaView] = []
    profiles = sorted({r.profile for r in replicas} | set(target.replicas))
    for profile in profiles:
        mine = [r for r in replicas if r.profile == profile]
        ready = [r for r in mine if r.state == "ready"]
        starting = sorted((r for r in mine if r.state == "starting"), key=lambda r: -r.started_s)
        draining = sorted((r for r in mine if r.state == "draining"), key=lambda r: -r.num_in_flight)
        want, have = target.replicas.get(profile, 0), len(ready) + len(starting)
        if have < want:
            back = draining[: want - have]
            undrain += [r.replica_id for r in back]
            if want - have - len(back):
                start[profile] = want - have - len(back)
        elif have > want:
            extra = have - want
            cancel += [r.replica_id for r in starting[:extra]]
            extra -= min(extra, len(starting))
            surplus += sorted(ready, key=lambda r: r.num_in_flight)[:extra]
    num_ready = sum(1 for r in replicas if r.state == "ready") + sum(
        1 for r in replicas if r.replica_id in undrain and r.state == "draining"
    )
    room = max(0, num_ready - target.total)
    # Replicas of profiles the target no longer wants go first, then the least loaded.
    surplus.sort(key=lambda r: (r.profile in target.replicas, r.num_in_flight))
    drain = tuple(r.replica_id for r in surplus[:room])
    return Actions(start=start, cancel=tuple(cancel), undrain=tuple(undrain), drain=drain)
