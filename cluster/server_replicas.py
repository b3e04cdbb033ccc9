"""``Server``'s replicas added and removed while it serves: the hooks ``Fleet`` (fleet.py) acts
through. Kept apart from server.py, which starts and stops everything; both work on the same
``Server`` state (its actors, generations, cluster state, supervisor).

A replica added here gets a new id, its own engine config (an engine profile's), starts, runs
its probe step, and only then enters routing (its handle in the cluster state and the
gateway, its registration in Redis or the router) and supervision. A replica removed here
leaves supervision first (the supervisor must not route to it again or make it anew), then
routing, then stops; its placement groups are freed.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import ray

from kvtide.cluster.frontend.ray_handles import RayReplicaHandle
from kvtide.cluster.replica.actor import stop_replica
from kvtide.cluster.replica.placement import remove_groups
from kvtide.router import ReplicaRegistration
from kvtide.workers import ResolvedConfig

if TYPE_CHECKING:
    from kvtide.cluster.frontend.cluster_state import ClusterState
    from kvtide.cluster.frontend.gateway import Gateway
    from kvtide.cluster.supervisor import Supervisor


class ReplicaChanges:
    """Mixed into ``Server``; these are the attributes of it that the hooks use."""

    _actors: dict[str, Any]
    _generation: dict[str, int]
    _resolved_of: dict[str, ResolvedConfig]
    _state: ClusterState | None
    gateway: Gateway | None
    supervisor: Supervisor | None
    redis_url: str | None
    placement_owner: str

    async def add_replica(self, rid: str, resolved: ResolvedConfig) -> ReplicaRegistration:
        """Make a replica of ``resolved`` under the new id ``rid``, wait until it is ready, and
        put it in routing and under supervision. On failure or cancellation it is stopped and
        forgotten, and the error raised."""
        if rid in self._actors or self._state is None or self.gateway is None:
            why = "the id is taken" if rid in self._actors else "the server is not serving"
            raise ValueError(f"cannot add replica {rid!r}: {why}")
        self._resolved_of[rid] = resolved
        actor = self._actors[rid] = self._new_actor(rid)  # type: ignore[attr-defined]
        try:
            await self._wait_ready(rid, actor)  # type: ignore[attr-defined]
            reg = await actor.registration.remote(rid)
            handle = RayReplicaHandle(rid, actor)
            self._state.handles[rid] = handle  # type: ignore[index]
            self.gateway.replicas.handles[rid] = handle
            if self._state.store is not None:
                await actor.start_publishing.remote(self.redis_url, rid)
            else:
                self._state.register(reg)
        except BaseException:
            await asyncio.shield(self.remove_replica(rid))
            raise
        if self.supervisor is not None:
            self.supervisor.watch(rid)
        return reg

    async def remove_replica(self, rid: str) -> None:
        """Take ``rid`` out of supervision and routing, stop it and free its placement groups.
        The caller drained it first; a request still on it moves to another replica. Its
        handles stay (a request in flight may still name it) until ``forget_replica``."""
        if self.supervisor is not None:
            self.supervisor.unwatch(rid)
        if self._state is not None:
            self._state.set_healthy(rid, False)
        actor = self._actors.pop(rid, None)
        if actor is not None:
            await stop_replica(actor)
        if ray.is_initialized():
            await asyncio.to_thread(remove_groups, f"{self.placement_owner}/{rid}")
        self._generation.pop(rid, None)
        self._resolved_of.pop(rid, None)

    def forget_replica(self, rid: str) -> None:
        """Drop a removed replica's handles and its place in the cluster state's sets (once its
        registry entry is gone: while it is ``unhealthy`` a stale entry is not routed to)."""
        if self._state is not None:
            self._state.handles.pop(rid, None)  # type: ignore[attr-defined]
            self._state.unhealthy.discard(rid)
            self._state.lost.discard(rid)
        if self.gateway is not None:
            self.gateway.replicas.handles.pop(rid, None)
