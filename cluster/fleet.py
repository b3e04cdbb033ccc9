"""``Fleet``: the running server's replicas as the autoscaler changes them.

Each replica belongs to an engine profile and is starting, ready or draining:

- **add** a replica of a profile: its engine is the server's engine with the profile's sizing
  (``EngineProfile.engine_kwargs``, TP x PP), resolved for this Ray cluster; it enters routing
  once it has run its probe step (``Server.add_replica``);
- **drain** a replica: it leaves routing at once (no new request), its in-flight requests get
  ``drain_timeout_s`` to finish, then it stops and its placement groups are freed. A request
  still on it then moves to another replica (the gateway's migration), so nothing is lost;
- **roll** to a profile: the new replicas are made first and the old ones drained after, one
  at a time, never taking the ready replicas below the floor.

``apply(actions)`` runs ``plan_actions``' actions (autoscaler/actions.py) on background tasks,
so the control loop never waits on a cold start or a drain; ``views()`` is what it plans on.
A failed start is logged and its replica forgotten: the next plan asks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kvtide.cluster.autoscaler.actions import Actions, ReplicaState, ReplicaView
from kvtide.cluster.autoscaler.profile import EngineProfile
from kvtide.cluster.startup import engine_for_cluster
from kvtide.workers import EngineConfig, ResolvedConfig, resolve_engine

logger = logging.getLogger(__name__)


def engine_for_profile(base: EngineConfig, profile: EngineProfile) -> EngineConfig:
    """``base`` (the model, device, prefix caching ...) with ``profile``'s sizing."""
    parts = (base.model, base.cache, base.scheduler, base.parallel)
    flat = {f.name: getattr(part, f.name) for part in parts for f in dataclasses.fields(part)}
    flat.update(profile.engine_kwargs(), seed=base.seed, tensor_parallel_size=profile.tp,
                pipeline_parallel_size=profile.pp)  # fmt: skip
    return EngineConfig.from_kwargs(**flat)


@dataclass
class Member:
    replica_id: str
    profile: str
    state: ReplicaState
    started_s: float
    task: asyncio.Task | None = None
    stopping: bool = False
    """Past the drain's wait: it is being stopped and can no longer be undrained."""


class Fleet:
    def __init__(self, server, profiles: Mapping[str, EngineProfile], initial_profile: str, *,
                 drain_timeout_s: float = 60.0, forget_after_s: float = 10.0, poll_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic,
                 resolve: Callable[[EngineConfig], ResolvedConfig] | None = None) -> None:  # fmt: skip
        """``server``: a started ``Server``; its replicas are ``initial_profile``'s. ``resolve``:
        an engine config to the replicas' resolved one (default: for this Ray cluster)."""
        if initial_profile not in profiles:
            raise ValueError(f"initial_profile: {initial_profile!r} is not in profiles ({', '.join(profiles)})")
        if drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s: {drain_timeout_s} must be >= 0")
        self.server, self.profiles = server, dict(profiles)
        self.drain_timeout_s, self.forget_after_s, self.poll_s, self.clock = drain_timeout_s, forget_after_s, poll_s, clock
        now = clock()
        self.members = {rid: Member(rid, initial_profile, "ready", now) for rid in server._actors}
        self._ids = itertools.count(len(server._actors))
        self._resolved: dict[str, ResolvedConfig] = {}
        self._resolve_engine = resolve or self._for_cluster
        self._tasks: set[asyncio.Task] = set()
        self.cold_start_s: float | None = None
        """The last measured start: asked for -> ready and routed."""
        self.num_failed_starts = 0

    # ---- what the control loop sees ----------------------------------------------------

    def in_flight(self, rid: str) -> int:
        """Requests the gateway is streaming from ``rid`` now."""
        # NOTE: the gateway's own table: it counts a request from the moment it is routed,
        # before the replica has it, which the replica's load would miss.
        active = self.server.gateway._active.values() if self.server.gateway is not None else ()
        return sum(1 for a in active if a.routed.replica_id == rid)

    def views(self) -> list[ReplicaView]:
        return [ReplicaView(m.replica_id, m.profile, m.state, self.in_flight(m.replica_id), m.started_s)
                for m in self.members.values()]  # fmt: skip

    def num_ready(self) -> int:
        return sum(1 for m in self.members.values() if m.state == "ready")

    # ---- actions -----------------------------------------------------------------------

    def apply(self, actions: Actions) -> None:
        """Start what ``actions`` asks on background tasks; returns at once."""
        for rid in actions.cancel:
            self.cancel(rid)
        for rid in actions.undrain:
            self.undrain(rid)
        for rid in actions.drain:
            self.drain(rid)
        for profile, n in actions.start.items():
            for _ in range(n):
                self.start(profile)

    def start(self, profile: str) -> str:
        """Ask for a replica of ``profile``; returns its id (it serves once ready)."""
        if profile not in self.profiles:
            raise ValueError(f"profile: {profile!r} is not in profiles ({', '.join(self.profiles)})")
        rid = f"replica-{next(self._ids)}"
        m = self.members[rid] = Member(rid, profile, "starting", self.clock())
        m.task = self._spawn(self._add(m))
        return rid

    async def add(self, profile: str) -> str:
        """A replica of ``profile``, ready and routed; raises what its start raised."""
        rid = self.start(profile)
        await asyncio.shield(self.members[rid].task)
        if rid not in self.members:
            raise RuntimeError(f"{rid} ({profile}) did not start; see the log")
        return rid

    def cancel(self, rid: str) -> None:
        m = self.members.get(rid)
        if m is not None and m.state == "starting" and m.task is not None:
            logger.info("fleet: cancelling the start of %s (%s)", rid, m.profile)
            m.task.cancel()

    def drain(self, rid: str) -> None:
        m = self.members.get(rid)
        if m is None or m.state == "draining":
            return
        if m.state == "starting":
            self.cancel(rid)
            return
        m.state = "draining"
        if self.server.supervisor is not None:
            self.server.supervisor.unwatch(rid)
        self.server._state.set_healthy(rid, False)  # out of routing now
        logger.info("fleet: draining %s (%s): %d request(s) in flight", rid, m.profile, self.in_flight(rid))
        m.task = self._spawn(self._drain(m))

    async def drain_and_stop(self, rid: str) -> None:
        self.drain(rid)
        m = self.members.get(rid)
        if m is not None and m.task is not None:
            await asyncio.shield(m.task)

    def undrain(self, rid: str) -> None:
        """A draining replica back in routing (cheaper than a cold start), unless it is stopping."""
        m = self.members.get(rid)
        if m is None or m.state != "draining" or m.stopping:
            return
        if m.task is not None:
            m.task.cancel()
        m.state, m.task = "ready", None
        self.server._state.set_healthy(rid, True)
        if self.server.supervisor is not None:
            self.server.supervisor.watch(rid)
        logger.info("fleet: %s (%s) is back in routing", rid, m.profile)

    async def roll(self, profile: str, count: int, floor: int) -> None:
        """Make before break: ``count`` replicas of ``profile`` first, then drain every replica
        of other profiles, one at a time, while the ready replicas stay at or above ``floor``."""
        old = [m.replica_id for m in self.members.values() if m.profile != profile and m.state != "draining"]
        have = sum(1 for m in self.members.values() if m.profile == profile and m.state != "draining")
        await asyncio.gather(*(self.add(profile) for _ in range(max(0, count - have))))
        for rid in sorted(old, key=self.in_flight):
            if self.num_ready() - 1 < floor:
                logger.warning("fleet: %s stays: draining it would leave %d ready, below the floor %d",
                               rid, self.num_ready() - 1, floor)  # fmt: skip
                continue
            await self.drain_and_stop(rid)

    # ---- the work behind them ----------------------------------------------------------

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _resolve(self, profile: str) -> ResolvedConfig:
        if profile not in self._resolved:
            server, p = self.server, self.profiles[profile]
            router = server._state.router
            if p.block_size != router.block_size:
                raise ValueError(f"profile {profile!r}: block_size {p.block_size} differs from the serving "
                                 f"replicas' {router.block_size}; the router needs one block size")  # fmt: skip
            limits = server.gateway.limits
            if p.max_model_len < limits.max_model_len:
                logger.warning("fleet: profile %r holds %d tokens, fewer than the %d the frontend accepts: longer "
                               "requests routed to it fail", profile, p.max_model_len, limits.max_model_len)  # fmt: skip
            engine = engine_for_profile(server.config.engine, p)
            self._resolved[profile] = await asyncio.to_thread(self._resolve_engine, engine)
        return self._resolved[profile]

    def _for_cluster(self, engine: EngineConfig) -> ResolvedConfig:
        return resolve_engine(engine_for_cluster(dataclasses.replace(self.server.config, engine=engine)))

    async def _add(self, m: Member) -> None:
        try:
            resolved = await self._resolve(m.profile)
            await self.server.add_replica(m.replica_id, resolved)
        except asyncio.CancelledError:
            self.members.pop(m.replica_id, None)
            raise
        except Exception as exc:  # noqa: BLE001 - logged; the next plan asks again
            self.members.pop(m.replica_id, None)
            self.num_failed_starts += 1
            logger.warning("fleet: %s (%s) did not start: %s", m.replica_id, m.profile, exc)
            return
        self.cold_start_s = self.clock() - m.started_s
        m.state, m.task = "ready", None
        logger.info("fleet: %s (%s) is serving after %.1f s", m.replica_id, m.profile, self.cold_start_s)

    async def _drain(self, m: Member) -> None:
        rid = m.replica_id
        deadline = self.clock() + self.drain_timeout_s
        while self.in_flight(rid) and self.clock() < deadline:
            await asyncio.sleep(self.poll_s)
        m.stopping = True
        left = self.in_flight(rid)
        if left:
            logger.warning("fleet: %s still has %d request(s) after the %g s drain; they move to other replicas",
                           rid, left, self.drain_timeout_s)  # fmt: skip
        await self.server.remove_replica(rid)
        self.members.pop(rid, None)
        logger.info("fleet: %s (%s) drained and stopped", rid, m.profile)
        self._spawn(self._forget(rid))

    async def _forget(self, rid: str) -> None:
        await asyncio.sleep(self.forget_after_s)  # its registry entry is gone by then
        self.server.forget_replica(rid)

    async def close(self, timeout_s: float = 30.0) -> None:
        """Cancel what is under way (the server's stop stops every replica it still has)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout_s)
