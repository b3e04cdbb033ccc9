"""The autoscaler's control loop: every ``control_interval_s``, observe, decide, act.

One tick (``tick``):

1. **Observe.** ``signals()`` reads the frontend's live state: its cumulative latency and
   length histograms (``LiveSignals``), the queue and the KV usage now. The loop keeps the
   readings of the last ``window_s`` and turns the difference between now and the window's
   start into an ``Observation`` (arrival rate, TTFT / ITL / ISL / OSL percentiles from the
   histograms' buckets); the fleet's replicas per profile come from ``fleet.views()``.
2. **Decide.** The configured policy (registry.py) maps it to a ``Target``; the loop keeps the
   policy's state between ticks.
3. **Act.** ``plan_actions`` (actions.py) turns target and fleet into starts, cancels,
   undrains and drains, make before break; ``fleet.apply`` runs them without waiting. On a Ray
   cluster ``request_resources`` asks Ray's autoscaler for the shards of the whole target
   fleet, so nodes come up for replicas about to start.
4. **Report.** One log line with the target and its reason; the target, the fleet and a count
   of decisions by action on the frontend's ``/metrics``.

The loop imports no Ray and no server: its fleet, signals, clocks and ``request_resources``
are passed in. A tick that fails is logged and counted; the next tick tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from kvtide.cluster.autoscaler.actions import Actions, ReplicaView, counts, plan_actions
from kvtide.cluster.autoscaler.config import AutoscaleConfig
from kvtide.cluster.autoscaler.histograms import Histogram, window_percentiles
from kvtide.cluster.autoscaler.loop_metrics import LoopMetrics
from kvtide.cluster.autoscaler.observation import Observation, Target
from kvtide.cluster.autoscaler.registry import make_policy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveSignals:
    """The frontend's state at one instant; histograms are cumulative since it started."""

    ttft_s: Histogram
    itl_s: Histogram
    prompt_tokens: Histogram
    """Observed when a request finishes (its ISL)."""
    output_tokens: Histogram
    arrivals: Histogram
    """One observation per admitted request (the queue-time histogram): its count is arrivals."""
    queue_depth: int
    kv_usage: float


class FleetHandle(Protocol):
    cold_start_s: float | None
    """The last measured cold start (None: none measured yet)."""

    def views(self) -> list[ReplicaView]: ...

    def apply(self, actions: Actions) -> None:
        """Start the actions; returns at once."""
        ...


def action_of(before: Mapping[str, int], target: Target) -> str:
    """How a decision is counted against ``before`` (the last target; the fleet at first): up,
    down, roll (a profile changes, the total does not), hold."""
    total = sum(before.values())
    if target.total != total:
        return "up" if target.total > total else "down"
    wanted = {p: n for p, n in target.replicas.items() if n}
    return "hold" if wanted == {p: n for p, n in before.items() if n} else "roll"


def describe(actions: Actions) -> str:
    parts = [f"start {n} {p}" for p, n in sorted(actions.start.items()) if n]
    parts += [f"{verb} {', '.join(ids)}" for verb, ids in
              (("cancel", actions.cancel), ("undrain", actions.undrain), ("drain", actions.drain)) if ids]  # fmt: skip
    return "; ".join(parts) or "nothing to do"


def initial_target(config: AutoscaleConfig, when: datetime) -> tuple[str, int]:
    """(profile, replicas) to start the server with: the largest part of what the policy wants
    of an idle fleet at ``when`` (at least one replica)."""
    policy = make_policy(config.policy, config)
    idle = Observation(time=when, window_s=config.window_s, request_rate=0.0, queue_depth=0, kv_usage=0.0,
                       ttft_s=None, itl_s=None, isl=None, osl=None, replicas={},
                       cold_start_s=config.cold_start_s)  # fmt: skip
    target = policy.decide(idle, policy.initial_state()).target
    if not target.total:
        first = next(iter(config.profiles))
        return next((name for _, name in config.profile_references()), first), 1
    profile = max(sorted(target.replicas), key=lambda p: target.replicas[p])
    return profile, target.replicas[profile]


class ControlLoop:
    def __init__(
        self,
        config: AutoscaleConfig,
        fleet: FleetHandle,
        signals: Callable[[], LiveSignals],
        *,
        shard_bundle: Mapping[str, float] | None = None,
        request_resources: Callable[[list[dict[str, float]]], None] | None = None,
        registry: Any = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        """``shard_bundle``: what one shard asks Ray for ({"CPU": 1} or {"GPU": 1});
        ``request_resources``: Ray's ``ray.autoscaler.sdk.request_resources(bundles=...)``, None
        off a Ray cluster; ``registry``: the frontend's Prometheus registry (None: no metrics)."""
        self.config, self.fleet, self.signals = config, fleet, signals
        self.policy = make_policy(config.policy, config)
        self.state = self.policy.initial_state()
        self.shard_bundle = dict(shard_bundle or {"CPU": 1.0})
        self.request_resources = request_resources
        self.clock, self.wall = clock, wall
        self.metrics = LoopMetrics(registry) if registry is not None else None
        self._readings: deque[tuple[float, LiveSignals]] = deque()
        self.last_target: Target | None = None
        self.num_ticks = self.num_errors = 0
        self._requested: list[dict[str, float]] | None = None
        self._stopped = asyncio.Event()

    def observe(self, now_s: float, views: Sequence[ReplicaView]) -> Observation:
        live = self.signals()
        self._readings.append((now_s, live))
        # Keep the newest reading at or before the window's start: the window's base.
        while len(self._readings) > 1 and self._readings[1][0] <= now_s - self.config.window_s:
            self._readings.popleft()
        base_s, base = self._readings[0]
        span_s = now_s - base_s
        replicas, starting = counts(views)
        cold = self.fleet.cold_start_s
        return Observation(
            time=self.wall(), window_s=span_s if span_s > 0 else self.config.window_s,
            request_rate=(live.arrivals.count - base.arrivals.count) / span_s if span_s > 0 else 0.0,
            queue_depth=live.queue_depth, kv_usage=min(1.0, max(0.0, live.kv_usage)),
            ttft_s=window_percentiles(base.ttft_s, live.ttft_s), itl_s=window_percentiles(base.itl_s, live.itl_s),
            isl=window_percentiles(base.prompt_tokens, live.prompt_tokens),
            osl=window_percentiles(base.output_tokens, live.output_tokens),
            replicas=replicas, starting=starting,
            cold_start_s=self.config.cold_start_s if cold is None else cold,
        )  # fmt: skip

    def bundles(self, target: Target) -> list[dict[str, float]]:
        """Ray resources of every shard of the target fleet."""
        shards = sum(n * self.config.profiles[p].num_devices for p, n in target.replicas.items()
                     if p in self.config.profiles)  # fmt: skip
        return [dict(self.shard_bundle) for _ in range(shards)]

    def tick(self) -> Target | None:
        """One round; returns the target (None when the round failed: logged, counted)."""
        self.num_ticks += 1
        try:
            views = self.fleet.views()
            obs = self.observe(self.clock(), views)
            decision = self.policy.decide(obs, self.state)
            self.state, target = decision.state, decision.target
            actions = plan_actions(views, target)
            # NOTE: against the last target, not the fleet: while a roll or a drain is under
            # way the fleet differs from a target that does not change, which is a hold.
            action = action_of(self.last_target.replicas if self.last_target else obs.replicas, target)
            logger.info("autoscaler: %s [%s] -> %s; %s", dict(obs.replicas), action, target, describe(actions))
            self.last_target = target
            if self.metrics is not None:
                self.metrics.decided(target, action, views)
            self.fleet.apply(actions)
            self._ask_ray(target)
            return target
        except Exception:  # noqa: BLE001 - a failed tick never stops the loop or the server
            self.num_errors += 1
            if self.metrics is not None:
                self.metrics.errors.inc()
            logger.exception("autoscaler: tick %d failed; trying again in %g s", self.num_ticks,
                             self.config.control_interval_s)  # fmt: skip
            return None

    def _ask_ray(self, target: Target) -> None:
        if self.request_resources is None:
            return
        bundles = self.bundles(target)
        if bundles != self._requested:  # the request stands until replaced: ask again only on change
            self.request_resources(bundles)
            self._requested = bundles

    async def run(self) -> None:
        """Tick every ``control_interval_s`` until ``stop``."""
        while not self._stopped.is_set():
            self.tick()
            try:
                await asyncio.wait_for(self._stopped.wait(), self.config.control_interval_s)
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        self._stopped.set()
