"""``ClusterState`` without Redis: the load poll of fake handles feeds the router and finds a
dead replica while it is idle."""

from __future__ import annotations

import asyncio

import pytest

from kvtide.cluster.frontend.cluster_state import ClusterState
from kvtide.cluster.frontend.handles import ReplicaGone
from kvtide.cluster.frontend.replicas import NoReplicaAvailable, ReplicaSet
from kvtide.proto.block_hash import HASH_VERSION
from kvtide.router import ReplicaLoad, ReplicaRegistration, Router


class _Handle:
    def __init__(self, replica_id: str, error: BaseException | None = None, free: int = 10) -> None:
        self.replica_id, self.error, self.free, self.calls = replica_id, error, free, 0

    async def load(self) -> ReplicaLoad:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return ReplicaLoad(1, 0, self.free, 16, 0.5, prefix_cache_hit_tokens=7)


def _state(*handles: _Handle) -> ClusterState:
    state = ClusterState(Router("least_loaded", block_size=4), {h.replica_id: h for h in handles}, None,
                         load_interval_s=0.0)  # fmt: skip
    for h in handles:
        state.register(ReplicaRegistration(h.replica_id, 4, b"", HASH_VERSION, 16, "m"))
    return state


def test_a_replica_found_dead_while_idle_is_reported_once_and_not_asked_again():
    """No request saw it die; the load poll does, and tells the owner (who frees its
    placement) once. A replica that is only slow keeps being asked."""
    dead = _Handle("replica-0", error=ReplicaGone("dead"))
    slow = _Handle("replica-1", error=TimeoutError("slow"))
    state = _state(dead, slow)
    lost: list[str] = []
    state.on_replica_lost = lost.append

    async def poll_three_times() -> None:
        for _ in range(3):
            await state.poll_once()

    asyncio.run(poll_three_times())
    assert lost == ["replica-0"]
    assert (dead.calls, slow.calls) == (1, 3)
    assert state.router.replica_ids() == ["replica-1"]


def test_polled_loads_reach_the_router_and_the_status():
    busy, idle = _Handle("a", free=2), _Handle("b", free=14)
    state = _state(busy, idle)
    asyncio.run(state.poll_once())
    status = state.router.status()
    assert status.replica("a").load.num_free_blocks == 2 and status.replica("b").load.prefix_cache_hit_tokens == 7
    assert ReplicaSet(state.handles, state).choose(list(range(8)), 4).replica_id == "b"  # least loaded
    reply = state.status()
    assert [r.load.num_free_blocks for r in reply.replicas] == [2, 14] and reply.routing_policy == "least_loaded"


def test_without_a_router_replicas_take_turns_and_none_means_unavailable():
    replicas = ReplicaSet({"x": _Handle("x"), "y": _Handle("y")})
    assert [replicas.choose([1], 1).replica_id for _ in range(3)] == ["x", "y", "x"]
    with pytest.raises(NoReplicaAvailable, match="no replica is serving"):
        ReplicaSet({}).choose([1], 1)
