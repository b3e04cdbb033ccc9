"""The fleet simulator's loop: arrivals, routing, replicas, and a policy deciding every interval.

Time advances in syncs of ``sync_s`` (1 s). Each sync: starting replicas whose cold start has
passed become ready; the gateway's queue and the sync's arrivals are routed; every replica
runs its steps up to the sync's end (fleet_replica.py); draining replicas with nothing left
stop. Every ``control_interval_s`` the loop builds an ``Observation`` from a
``MetricsWindow`` (the same pure pieces the live control loop uses), asks the policy for a
target and applies ``plan_actions`` to the fleet.

Routing: to a ready, non-draining replica whose profile's ``max_model_len`` holds ISL + OSL,
the one with the fewest requests not yet at their first token (then the least KV usage), as
the router's least-loaded policy would. A request no ready replica can take waits in the
gateway queue if a starting replica (or the target) could take it, and is dropped after
``queue_timeout_s``; a request no profile of the fleet or its target can hold is refused.

The day starts warm: the replicas the policy wants at t = 0 are ready at once, as they would
be in a fleet that ran through the night before (a cold start at midnight is an artefact of
starting the simulation, not of the policy).

Cost: every replica counts from the moment it is asked for (the cold start is paid) until it
stops, times its devices (TP x PP); the day's GPU-hours are clipped to the day.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from kvtide.cluster.autoscaler.actions import ReplicaView, counts, plan_actions
from kvtide.cluster.autoscaler.config import AutoscaleConfig
from kvtide.cluster.autoscaler.cost_model import EngineCostModel
from kvtide.cluster.autoscaler.observation import Target
from kvtide.cluster.autoscaler.window import MetricsWindow

from fleet_replica import Request, SimReplica

DAY_S = 86400.0


@dataclass(frozen=True)
class SimSettings:
    start: datetime
    """Wall-clock time of t = 0 (aware)."""
    cost: EngineCostModel
    kv_tokens: dict[str, int]
    """KV capacity per profile, in tokens (kv_capacity.kv_tokens_capacity)."""
    sync_s: float = 1.0
    queue_timeout_s: float = 300.0
    tail_s: float = 3600.0
    """After the day: how long in-flight requests may still finish (no new arrivals)."""


@dataclass
class Replica:
    sim: SimReplica
    state: str
    started_s: float
    ready_s: float
    stopped_s: float | None = None


@dataclass
class SimResult:
    policy: str
    requests: list[Request]
    """Every request of the trace; one that never got its first token has a NaN ``first_token_s``."""
    itl: list[tuple[float, float, float]]
    replica_spans: list[tuple[float, float, int]]
    """(asked for, stopped, devices) of every replica."""
    timeline: list[tuple[float, dict[str, int], int, float, int]]
    """(t, serving replicas per profile, ready replicas, arrivals/s over the interval, queue depth)."""
    refused: int = 0
    timed_out: int = 0
    unfinished: int = 0
    """Still in flight when the tail ran out."""
    decisions: list[tuple[float, str]] = field(default_factory=list)

    def gpu_hours(self, until_s: float = DAY_S) -> float:
        return sum(max(0.0, min(stop, until_s) - start) * n for start, stop, n in self.replica_spans) / 3600


class FleetSim:
    def __init__(self, config: AutoscaleConfig, policy, settings: SimSettings, state=None) -> None:
        self.config, self.policy, self.s = config, policy, settings
        self.state = policy.initial_state() if state is None else state
        self.window = MetricsWindow(config.window_s)
        self.replicas: dict[str, Replica] = {}
        self.pending: deque[Request] = deque()
        self.target = Target({}, "nothing decided yet")
        self.itl: list[tuple[float, float, float]] = []
        self.spans: list[tuple[float, float, int]] = []
        self.timeline: list = []
        self.decisions: list[tuple[float, str]] = []
        self.created: list[Request] = []
        self.refused = self.timed_out = 0
        self._next_id = 0
        self._arrived_since = 0

    def _start(self, profile: str, now: float) -> None:
        rid = f"r{self._next_id:04d}"
        self._next_id += 1
        sim = SimReplica(rid, self.config.profiles[profile], self.s.kv_tokens[profile], self.s.cost, now)
        self.replicas[rid] = Replica(sim, "starting", now, now + self.config.cold_start_s)

    def _stop(self, rid: str, when: float) -> None:
        r = self.replicas.pop(rid)
        self.spans.append((r.started_s, when, r.sim.profile.num_devices))

    def _fits(self, profile: str, req: Request) -> bool:
        return req.isl + req.osl <= self.config.profiles[profile].max_model_len

    def _route(self, req: Request, now: float) -> bool:
        best = None
        for r in self.replicas.values():
            if r.state == "ready" and self._fits(r.sim.profile.name, req):
                key = (len(r.sim.queue) + len(r.sim.prefilling), r.sim.kv_usage)
                if best is None or key < best[0]:
                    best = (key, r)
        if best is None:
            return False
        best[1].sim.queue.append(req)
        return True

    def _could_ever_serve(self, req: Request) -> bool:
        profiles = {r.sim.profile.name for r in self.replicas.values() if r.state != "draining"}
        return any(self._fits(p, req) for p in profiles | set(self.target.replicas))

    def arrive(self, req: Request, now: float) -> None:
        self.window.arrived(req.arrival_s, req.isl)
        self._arrived_since += 1
        if not self._route(req, now):
            if self._could_ever_serve(req) or not self.replicas:
                self.pending.append(req)
            else:
                self.refused += 1

    def _collect(self, rep: Replica) -> None:
        ev = rep.sim.events
        for r in ev.first_tokens:
            self.window.first_token(r.first_token_s, r.first_token_s - r.arrival_s)
        for t, gap, n in ev.itl:
            self.window.tokens(t, gap, n)
        for r in ev.finished:
            self.window.finished(r.finished_s, r.osl)
        self.itl += ev.itl
        ev.first_tokens.clear()
        ev.finished.clear()
        ev.itl.clear()

    def sync(self, now: float, until: float) -> None:
        for r in self.replicas.values():
            if r.state == "starting" and r.ready_s <= now:
                r.state = "ready"
                r.sim.clock = max(r.sim.clock, r.ready_s)
        waiting, self.pending = self.pending, deque()
        for req in waiting:
            if now - req.arrival_s > self.s.queue_timeout_s:
                self.timed_out += 1
            elif not self._route(req, now):
                self.pending.append(req)
        for rid, r in list(self.replicas.items()):
            if r.state in ("ready", "draining"):
                r.sim.advance(until)
                self._collect(r)
                if r.state == "draining" and r.sim.num_in_flight == 0:
                    self._stop(rid, max(until, r.sim.clock))

    def control(self, now: float) -> None:
        views = [ReplicaView(rid, r.sim.profile.name, r.state, r.sim.num_in_flight, r.started_s)
                 for rid, r in self.replicas.items()]
        serving, starting = counts(views)
        ready = [r.sim for r in self.replicas.values() if r.state == "ready"]
        queue = len(self.pending) + sum(len(r.sim.queue) for r in self.replicas.values())
        obs = self.window.observe(
            now, self.s.start + timedelta(seconds=now), queue_depth=queue,
            kv_usage=sum(r.kv_usage for r in ready) / len(ready) if ready else 0.0,
            replicas=serving, starting=starting, cold_start_s=self.config.cold_start_s,
        )
        decision = self.policy.decide(obs, self.state)
        self.state = decision.state
        if dict(decision.target.replicas) != dict(self.target.replicas):
            self.decisions.append((now, str(decision.target)))
        self.target = decision.target
        actions = plan_actions(views, decision.target)
        for profile, n in actions.start.items():
            for _ in range(n):
                self._start(profile, now)
        for rid in actions.cancel:
            self._stop(rid, now)
        for rid in actions.undrain:
            self.replicas[rid].state = "ready"
        for rid in actions.drain:
            self.replicas[rid].state = "draining"
        self.timeline.append((now, serving, len(ready), self._arrived_since / self.config.control_interval_s, queue))
        self._arrived_since = 0

    def run(self, arrivals: list[tuple[float, int, int]], name: str) -> SimResult:
        """Replay ``arrivals`` (arrival_s, isl, osl), sorted, over one day plus the tail."""
        i, now, sync = 0, 0.0, self.s.sync_s
        # The day is a slice of a fleet that has been running: what the policy wants at
        # midnight is already up (and paid for from t = 0), not starting cold.
        self.control(0.0)
        for r in self.replicas.values():
            r.state, r.ready_s = "ready", 0.0
        next_control = self.config.control_interval_s
        while now < DAY_S or (now < DAY_S + self.s.tail_s and (self.pending or any(
                r.sim.num_in_flight for r in self.replicas.values()))):
            if now >= next_control:
                self.control(now)
                next_control += self.config.control_interval_s
            until = now + sync
            while i < len(arrivals) and arrivals[i][0] < until:
                t, isl, osl = arrivals[i]
                req = Request(i, t, isl, osl)
                self.created.append(req)
                self.arrive(req, now)
                i += 1
            self.sync(now, until)
            now = until
        unfinished = len(self.pending) + sum(r.sim.num_in_flight for r in self.replicas.values())
        for rid in list(self.replicas):
            self._stop(rid, now)
        return SimResult(name, self.created, self.itl, self.spans, self.timeline, self.refused, self.timed_out,
                         unfinished, self.decisions)
