"""StateStore and ClusterState against a real redis-server on loopback (about 0.1 s to start).

The replicas here are real ``BlockPool``s with real publishers: their KV events, load and
heartbeats travel through Redis to a ``ClusterState`` that feeds a ``Router``. The loops
that wait for the background tasks are bounded; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import redis

from kvtide.cluster.frontend.cluster_state import ClusterState
from kvtide.cluster.replica.publisher import ReplicaPublisher
from kvtide.cluster.state.redis_server import start_redis
from kvtide.cluster.state import codec
from kvtide.cluster.state.store import STORE_ERRORS, StateStore, StoreOptions
from kvtide.proto import kvtide_pb2 as pb
from kvtide.proto import AllBlocksCleared, BlocksRemoved, BlocksStored, hash_full_blocks
from kvtide.proto.block_hash import HASH_VERSION
from kvtide.router import ReplicaLoad, ReplicaRegistration, Router
from kvtide.workers.block_pool import BlockPool

BS = 4
SEED = b"s"
WAIT_S = 10.0
TICK_S = 0.02


@pytest.fixture
def redis_server():
    with start_redis() as server:
        yield server


def reg(rid: str, num_blocks: int = 16, **kw) -> ReplicaRegistration:
    return ReplicaRegistration(rid, BS, SEED, HASH_VERSION, num_blocks, "tiny", **kw)


def load(free: int = 16) -> ReplicaLoad:
    return ReplicaLoad(1, 2, free, 16, 0.25, 3)


async def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S} s waiting until {what}")
        await asyncio.sleep(TICK_S)


# ---- StateStore ---------------------------------------------------------------------------


def test_registry_load_and_events_round_trip(redis_server):
    h = hash_full_blocks(list(range(12)), BS, seed=SEED)
    events = [BlocksStored(0, tuple(h), None), BlocksStored(1, (h[2],), h[1]), BlocksRemoved(2, (h[0], h[1])), AllBlocksCleared(3)]

    async def main():
        store = StateStore(redis_server.url, StoreOptions(namespace="t1"))
        try:
            await store.publish(reg("r0", incarnation="a"), load(), events[:2], ttl_s=5.0)
            await store.publish(reg("r1"), None, [], ttl_s=5.0)
            assert await store.replicas() == {"r0": reg("r0", incarnation="a"), "r1": reg("r1")}
            assert await store.loads(["r0", "r1", "r9"]) == {"r0": load()}
            first = await store.read_events({"r0": b"0", "r1": b"0"})
            assert list(first) == ["r0"]
            assert first["r0"].events == tuple(events[:2])
            assert await store.read_events({"r0": first["r0"].cursor}) == {}
            await store.publish(reg("r0", incarnation="a"), load(), events[2:], ttl_s=5.0)
            more = await store.read_events({"r0": first["r0"].cursor}, count=1)
            assert more["r0"].events == (events[2],)
            rest = await store.read_events({"r0": more["r0"].cursor})
            assert rest["r0"].events == (events[3],)
            await store.unregister("r1")
            assert list(await store.replicas()) == ["r0"]
            await store.put_status(pb.ClusterStatusResponse(routing_policy="kv_aware"))
            assert (await store.status()).routing_policy == "kv_aware"
        finally:
            await store.close()

    asyncio.run(main())


_MESSAGE_OF_KEY = {"replica": pb.ReplicaRegistration, "load": pb.LoadReport, "status": pb.ClusterStatusResponse}


def test_every_value_the_store_writes_decodes_with_its_proto_class(redis_server):
    """Redis holds only serialized proto messages: each key's value (each stream entry's, for
    events) parses with the message its key names, and re-serializes to the same bytes."""
    h = hash_full_blocks(list(range(12)), BS, seed=SEED)
    events = [BlocksStored(0, tuple(h), None), BlocksRemoved(1, (h[0],)), AllBlocksCleared(2)]

    async def main():
        store = StateStore(redis_server.url, StoreOptions(namespace="tproto"))
        raw = redis.Redis.from_url(redis_server.url)
        try:
            await store.publish(reg("r0", incarnation="x"), load(), events, ttl_s=5.0)
            await store.put_status(pb.ClusterStatusResponse(routing_policy="kv_aware", num_queued=2))
            keys = sorted(k.decode() for k in raw.scan_iter(match="tproto:*"))
            assert keys == ["tproto:events:r0", "tproto:load:r0", "tproto:replica:r0", "tproto:status"]
            for key in keys:
                kind = key.split(":")[1]
                values = [f[b"event"] for _, f in raw.xrange(key)] if kind == "events" else [raw.get(key)]
                message = pb.KvEvent if kind == "events" else _MESSAGE_OF_KEY[kind]
                for value in values:
                    msg = message.FromString(value)
                    assert msg.SerializeToString(deterministic=True) == value, key
            assert codec.registration_from_proto(pb.ReplicaRegistration.FromString(raw.get("tproto:replica:r0"))) == reg(
                "r0", incarnation="x"
            )
            stored = [codec.event_from_proto(pb.KvEvent.FromString(f[b"event"])) for _, f in raw.xrange("tproto:events:r0")]
            assert stored == events
        finally:
            raw.close()
            await store.close()

    asyncio.run(main())


def test_registry_entries_expire_when_heartbeats_stop(redis_server):
    async def main():
        store = StateStore(redis_server.url, StoreOptions(namespace="t2"))
        try:
            await store.publish(reg("r0"), load(), [], ttl_s=0.2)
            await store.publish(reg("r1"), load(), [], ttl_s=30.0)
            assert list(await store.replicas()) == ["r0", "r1"]
            deadline = time.monotonic() + WAIT_S
            while list(await store.replicas()) != ["r1"]:
                assert time.monotonic() < deadline, "r0 never expired"
                await asyncio.sleep(TICK_S)
            assert await store.loads(["r0", "r1"]) == {"r1": load()}
        finally:
            await store.close()

    asyncio.run(main())


def test_calls_raise_a_store_error_when_redis_is_gone(redis_server):
    async def main():
        store = StateStore(redis_server.url, StoreOptions(retries=0))
        try:
            assert await store.ping()
            redis_server.stop()
            with pytest.raises(STORE_ERRORS):
                await store.replicas()
        finally:
            await store.close()

    asyncio.run(main())


# ---- ClusterState with real publishers ------------------------------------------------------


class FakeReplica:
    """A real BlockPool with a real publisher: "serving" a prompt caches its full blocks."""

    def __init__(self, url: str, rid: str, namespace: str, ttl_s: float = 1.0) -> None:
        self.rid = rid
        self.pool = BlockPool(16, enable_caching=True)
        self.publisher = ReplicaPublisher(
            url, reg(rid), self.pool.drain_events, self.load, interval_s=0.05, ttl_s=ttl_s,
            options=StoreOptions(namespace=namespace, retries=0),
        )
        self.publisher.start()

    def load(self) -> ReplicaLoad:
        return ReplicaLoad(0, 0, self.pool.num_free_blocks, 16, self.pool.usage)

    def serve(self, prompt: list[int]) -> None:
        hashes = hash_full_blocks(prompt, BS, seed=SEED)
        blocks = self.pool.allocate(len(hashes))
        self.pool.cache_full_blocks(blocks, hashes, None)
        self.pool.free(reversed(blocks))

    async def kv_snapshot(self):
        return self.pool.snapshot()


def prompt(base: int, num_blocks: int = 3) -> list[int]:
    return list(range(base, base + num_blocks * BS + 1))


async def start_cluster(url: str, namespace: str, rids=("r0", "r1"), ttl_s: float = 1.0):
    replicas = {rid: FakeReplica(url, rid, namespace, ttl_s) for rid in rids}
    router = Router(block_size=BS, hash_seed=SEED, seed=0, sync_timeout_s=1.0)
    state = ClusterState(
        router,
        replicas,
        StateStore(url, StoreOptions(namespace=namespace, retries=0)),
        poll_interval_s=0.05,
        resync_retry_s=0.1,
        missing_grace_s=0.5,
    )
    state.start()
    return replicas, router, state


async def stop_cluster(replicas, state) -> None:
    await state.stop()
    await state.store.close()
    for r in replicas.values():
        r.publisher.stop()


def all_exact(router: Router) -> bool:
    status = router.status().replicas
    return bool(status) and all(s.mode == "exact" for s in status)


def test_cluster_state_routes_on_events_from_redis(redis_server):
    async def main():
        replicas, router, state = await start_cluster(redis_server.url, "t3")
        try:
            await wait_until(lambda: router.replica_ids() == ["r0", "r1"] and all_exact(router), "both replicas are exact")
            replicas["r0"].serve(prompt(0))
            replicas["r1"].serve(prompt(1000))
            await wait_until(lambda: router.status().replica("r1").blocks_indexed == 3, "r1's events arrived")
            await wait_until(lambda: router.status().replica("r0").blocks_indexed == 3, "r0's events arrived")
            a = router.choose(prompt(0), 4)
            b = router.choose(prompt(1000), 4)
            assert (a.replica_id, a.cached_blocks, a.mode) == ("r0", 3, "exact")
            assert (b.replica_id, b.cached_blocks, b.mode) == ("r1", 3, "exact")
        finally:
            await stop_cluster(replicas, state)

    asyncio.run(main())


def test_lost_events_show_as_a_gap_and_the_replica_is_resynced(redis_server):
    async def main():
        replicas, router, state = await start_cluster(redis_server.url, "t4", rids=("r0",))
        try:
            await wait_until(lambda: all_exact(router), "r0 is exact")
            r0 = replicas["r0"]
            r0.publisher.stop(unregister=False)
            r0.serve(prompt(0))
            assert len(r0.pool.drain_events()) == 1  # lost on the way
            r0.publisher = ReplicaPublisher(
                redis_server.url, reg("r0"), r0.pool.drain_events, r0.load, interval_s=0.05, ttl_s=1.0,
                options=StoreOptions(namespace="t4"),
            )
            r0.publisher.start()
            resyncs = state.num_resyncs
            r0.serve(prompt(1000))  # event 1 arrives after a gap: event 0 never did
            await wait_until(lambda: state.num_resyncs > resyncs, "a resync")
            await wait_until(lambda: all_exact(router), "r0 is exact again")
            assert router.choose(prompt(0), 4).cached_blocks == 3  # known only from the snapshot
            assert router.choose(prompt(1000), 4).cached_blocks == 3
        finally:
            await stop_cluster(replicas, state)

    asyncio.run(main())


def test_redis_stopped_and_restarted_routing_goes_on_and_returns_to_exact(redis_server):
    port = redis_server.port

    async def main():
        replicas, router, state = await start_cluster(redis_server.url, "t5")
        restarted = None
        try:
            replicas["r0"].serve(prompt(0))
            replicas["r1"].serve(prompt(1000))
            await wait_until(
                lambda: router.replica_ids() == ["r0", "r1"] and all_exact(router)
                and [s.blocks_indexed for s in router.status().replicas] == [3, 3],
                "both prefixes are indexed",
            )
            redis_server.stop()
            await wait_until(lambda: not state.store_up, "the cluster state notices the outage")
            assert state.num_outages == 1
            # Last-known state: still routed by prefix, and says it is approximate.
            for _ in range(3):
                a = router.choose(prompt(0), 4)
                assert (a.replica_id, a.cached_blocks, a.mode) == ("r0", 3, "approximate")
                router.on_request_finished(a.replica_id, 13, 4)
            replicas["r1"].serve(prompt(2000))  # its events are dropped: Redis is down
            await wait_until(lambda: replicas["r1"].publisher.num_events_dropped > 0, "r1 drops its events")
            restarted = start_redis(port=port)
            await wait_until(lambda: state.store_up and all_exact(router), "every replica is exact again")
            assert router.replica_ids() == ["r0", "r1"]  # nobody was dropped for the outage
            c = router.choose(prompt(2000), 4)
            assert (c.replica_id, c.cached_blocks, c.mode) == ("r1", 3, "exact")
        finally:
            await stop_cluster(replicas, state)
            if restarted is not None:
                restarted.stop()

    asyncio.run(main())


def test_a_replica_whose_heartbeat_stops_stops_getting_requests(redis_server):
    async def main():
        replicas, router, state = await start_cluster(redis_server.url, "t6", ttl_s=0.5)
        try:
            await wait_until(lambda: router.replica_ids() == ["r0", "r1"], "both replicas registered")
            replicas["r1"].publisher.stop(unregister=False)  # as if killed
            await wait_until(lambda: router.replica_ids() == ["r0"], "r1 left the router")
            assert {router.choose(prompt(i), 4).replica_id for i in range(10)} == {"r0"}
        finally:
            await stop_cluster(replicas, state)

    asyncio.run(main())


def test_a_mismatched_replica_is_not_routed_to(redis_server):
    async def main():
        store = StateStore(redis_server.url, StoreOptions(namespace="t7"))
        router = Router(block_size=BS, hash_seed=SEED)
        empty = SimpleNamespace(kv_snapshot=lambda: asyncio.sleep(0, result=(-1, ())))
        state = ClusterState(router, {"r0": empty, "bad": empty}, store)
        try:
            await store.publish(reg("r0"), None, [], ttl_s=5.0)
            await store.publish(ReplicaRegistration("bad", 16, SEED, HASH_VERSION, 16, "tiny"), None, [], ttl_s=5.0)
            assert await state.poll_once()
            assert router.replica_ids() == ["r0"]
            assert router.mode("r0").value == "exact"
        finally:
            await store.close()

    asyncio.run(main())


def test_a_replica_reported_failed_leaves_at_once_and_a_clean_stop_leaves_the_registry(redis_server):
    async def main():
        replicas, router, state = await start_cluster(redis_server.url, "t8", ttl_s=30.0)
        try:
            await wait_until(lambda: router.replica_ids() == ["r0", "r1"], "both replicas registered")
            state.replica_failed("r1")  # its heartbeat would keep it for 30 s
            assert router.replica_ids() == ["r0"]
            await asyncio.sleep(0.3)  # several polls: the live registry entry does not bring it back
            assert router.replica_ids() == ["r0"]
            replicas["r0"].publisher.stop()  # a clean stop removes the entry now
            # The store is shared with the running ClusterState (as in a frontend), and the
            # stop below cancels its task mid-command: that once hung (redis-py swallowed
            # the cancellation).
            assert list(await state.store.replicas()) == ["r1"]
        finally:
            await stop_cluster(replicas, state)

    asyncio.run(main())
