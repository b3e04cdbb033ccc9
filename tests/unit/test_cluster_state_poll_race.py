"""``ClusterState``'s Redis polls under the faults the chaos test and soak found:

- a replica the supervisor takes out of routing while a poll is on its way (every such round
  failed with a KeyError from the router, so the other replicas' loads and KV events of that
  round were dropped);
- Redis back from an outage without the registrations (a restart): every replica missing from
  it was dropped from routing at the first poll, its grace counted from before the outage, so
  requests met "no replica" until the replicas published again.
"""

from __future__ import annotations

import asyncio

from kvtide.cluster.frontend.cluster_state import ClusterState
from kvtide.cluster.state.redis_server import start_redis
from kvtide.cluster.state.store import StateStore, StoreOptions
from kvtide.router import Router
from tests.unit.test_state_store import (
    BS,
    SEED,
    FakeReplica,
    all_exact,
    prompt,
    redis_server,
    start_cluster,
    stop_cluster,
    wait_until,
)

__all__ = ["redis_server"]  # the fixture, used by name


def test_a_replica_leaving_routing_mid_poll_does_not_fail_the_round_for_the_others(redis_server):
    async def main():
        replicas, router, state = await start_cluster(redis_server.url, "race", ttl_s=30.0)
        try:
            await wait_until(lambda: router.replica_ids() == ["r0", "r1"] and all_exact(router), "both exact")
            await state.stop()  # the rounds below run by hand
            real_loads = state.store.loads

            async def loads(ids):
                out = await real_loads(ids)
                state.set_healthy("r1", False)  # the supervisor's verdict lands during the await
                return out

            state.store.loads = loads
            replicas["r0"].serve(prompt(0))
            await asyncio.sleep(0.3)  # r0's publisher has put its events in Redis
            assert await state.poll_once()
            assert router.replica_ids() == ["r0"]
            assert router.status().replica("r0").blocks_indexed == 3  # r0's events of that round applied
        finally:
            await stop_cluster(replicas, state)

    asyncio.run(main())


async def poll_until(state: ClusterState, predicate, what: str, tries: int = 200) -> None:
    """Polls by hand (the clock stands still) until ``predicate()``; bounded."""
    for _ in range(tries):
        if await state.poll_once() and predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not {what} after {tries} polls")


def test_replicas_missing_from_a_restarted_redis_get_their_grace_from_its_return(redis_server):
    async def main():
        now = [1000.0]
        replicas = {rid: FakeReplica(redis_server.url, rid, "back", ttl_s=30.0) for rid in ("r0", "r1")}
        router = Router(block_size=BS, hash_seed=SEED, seed=0, sync_timeout_s=1.0)
        store = StateStore(redis_server.url, StoreOptions(namespace="back", retries=0))
        state = ClusterState(router, replicas, store, missing_grace_s=1.0, clock=lambda: now[0])
        fresh = None
        try:
            await poll_until(state, lambda: router.replica_ids() == ["r0", "r1"], "both registered")
            for r in replicas.values():
                r.publisher.stop(unregister=False)  # they publish again only later (or never)
            port = redis_server.port
            redis_server.stop()
            now[0] += 0.5
            assert not await state.poll_once()
            now[0] += 5.0  # a 5 s outage; the Redis that comes back is empty
            fresh = start_redis(port=port)
            await poll_until(state, lambda: True, "Redis answering again")
            assert router.replica_ids() == ["r0", "r1"]  # missing, but within the grace from its return
            now[0] += 1.5  # still missing past the grace: gone
            assert await state.poll_once()
            assert router.replica_ids() == []
            assert state.lost == {"r0", "r1"}
        finally:
            await store.close()
            if fresh is not None:
                fresh.stop()

    asyncio.run(main())
