"""A replica the supervisor takes out of routing while a Redis poll is on its way (found by the
chaos test: every poll round then failed with a KeyError from the router, so the other
replicas' loads and KV events of that round were dropped)."""

from __future__ import annotations

import asyncio

from tests.unit.test_state_store import all_exact, prompt, redis_server, start_cluster, stop_cluster, wait_until

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
