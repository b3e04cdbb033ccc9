"""Routing over real replica actors: publishers -> Redis -> ClusterState -> Router.

Two tiny-model replicas on the loopback Ray cluster publish to a real redis-server. The
router must learn each replica's cache from its KV events (a repeated prompt goes back to
the replica that computed it, and the engine confirms the hit), resync from a real
``kv_snapshot``, and drop a killed replica once its heartbeat expires.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
import ray

from kvtide.cluster.frontend.cluster_state import ClusterState
from kvtide.cluster.frontend.ray_handles import RayReplicaHandle
from kvtide.cluster.replica.actor import ReplicaActor
from kvtide.cluster.replica.placement import remove_groups
from kvtide.cluster.replica.spec import ReplicaSpec
from kvtide.cluster.state.redis_server import start_redis
from kvtide.cluster.state.store import StateStore
from kvtide.proto.block_hash import HASH_VERSION, hash_full_blocks
from kvtide.router import ReplicaRegistration, Router
from kvtide.workers import EngineRequest, SamplingParams

from tests.tiny import write_tiny_llama

pytestmark = pytest.mark.slow

NUM_BLOCKS = 64
BLOCK_SIZE = 16
TTL_S = 1.0
STARTUP_TIMEOUT_S = 180.0
WAIT_S = 20.0
PARAMS = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=4)
PROMPT = [(7 * i + 3) % 90 + 3 for i in range(3 * BLOCK_SIZE + 1)]  # 3 full blocks + 1 token


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("routing") / "tiny", num_layers=2, max_position=1024)


@pytest.fixture(scope="module")
def redis_server():
    with start_redis() as server:
        yield server


@pytest.fixture(scope="module")
def actors(cluster, tiny_dir, redis_server):
    actors = {
        f"replica-{i}": ReplicaActor.options(num_cpus=0).remote(
            ReplicaSpec.load(str(tiny_dir), cpus_per_shard=1.0, start_timeout_s=STARTUP_TIMEOUT_S,
                             num_blocks=NUM_BLOCKS, placement_owner=f"routing-test/replica-{i}", model_name="tiny")
        )
        for i in range(2)
    }
    ray.get([a.health.remote() for a in actors.values()], timeout=STARTUP_TIMEOUT_S + 60)
    regs = ray.get(
        [a.start_publishing.remote(redis_server.url, rid, 0.05, TTL_S) for rid, a in actors.items()],
        timeout=STARTUP_TIMEOUT_S,
    )
    assert [r.replica_id for r in regs] == ["replica-0", "replica-1"]
    yield actors
    for a in actors.values():
        try:
            ray.get(a.stop_publishing.remote(), timeout=10)
            ray.get(a.shutdown.remote(), timeout=10)
        except ray.exceptions.RayError:
            pass  # the test killed it
        ray.kill(a)
    remove_groups("routing-test")  # the killed one's: Ray keeps them while this job runs


async def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S} s waiting until {what}")
        await asyncio.sleep(0.05)


async def generate(actor, prompt):
    request = EngineRequest(f"req-{uuid.uuid4().hex[:12]}", tuple(prompt), PARAMS)
    deltas = [await ref async for ref in actor.generate.options(num_returns="streaming").remote(request)]
    assert deltas[-1].finish_reason == "length", deltas[-1]
    return deltas[-1]


def with_cluster_state(redis_server, actors, body):
    async def main():
        router = Router(block_size=BLOCK_SIZE, seed=0)
        store = StateStore(redis_server.url)
        handles = {rid: RayReplicaHandle(rid, a) for rid, a in actors.items()}
        state = ClusterState(router, handles, store, poll_interval_s=0.05, missing_grace_s=0.5)
        state.start()
        try:
            await wait_until(
                lambda: router.replica_ids() == sorted(actors) and all(router.mode(r).value == "exact" for r in actors),
                "both replicas are registered and exact",
            )
            await body(router, state)
        finally:
            await state.stop()
            await store.close()

    asyncio.run(main())


def test_replicas_register_what_they_hash_with(actors):
    reg = ray.get(actors["replica-0"].registration.remote("replica-0"))
    assert (reg.block_size, reg.hash_seed, reg.hash_version, reg.num_blocks, reg.model) == (
        BLOCK_SIZE, b"", HASH_VERSION, NUM_BLOCKS, "tiny",
    )
    assert isinstance(reg, ReplicaRegistration) and reg.incarnation


def test_a_repeated_prompt_goes_back_to_its_cache_and_hits(redis_server, actors):
    async def body(router: Router, state: ClusterState) -> None:
        first = router.choose(PROMPT, PARAMS.max_tokens)
        assert first.cached_blocks == 0
        done = await generate(actors[first.replica_id], PROMPT)
        router.on_request_finished(first.replica_id, len(PROMPT), 4)
        assert done.num_cached_tokens == 0
        await wait_until(
            lambda: router.status().replica(first.replica_id).blocks_indexed >= 3, "the events reached the router"
        )
        again = router.choose(PROMPT, PARAMS.max_tokens)
        assert (again.replica_id, again.cached_blocks, again.mode) == (first.replica_id, 3, "exact")
        hit = await generate(actors[again.replica_id], PROMPT)
        assert hit.num_cached_tokens == 3 * BLOCK_SIZE  # the engine agrees with the router

    with_cluster_state(redis_server, actors, body)


def test_a_snapshot_holds_what_the_events_said(redis_server, actors):
    async def body(router: Router, state: ClusterState) -> None:
        snaps = {rid: await a.kv_snapshot.remote() for rid, a in actors.items()}
        hashes = set(hash_full_blocks(PROMPT, BLOCK_SIZE)[:3])
        holders = [rid for rid, s in snaps.items() if hashes <= set(s.block_hashes)]
        assert len(holders) == 1  # the previous test computed PROMPT on one replica
        # A fresh router learned it from the snapshot it took on registration.
        d = router.choose(PROMPT, PARAMS.max_tokens)
        assert (d.replica_id, d.cached_blocks) == (holders[0], 3)

    with_cluster_state(redis_server, actors, body)


def test_a_killed_replica_stops_getting_requests(redis_server, actors):
    async def body(router: Router, state: ClusterState) -> None:
        ray.kill(actors["replica-1"])
        await wait_until(lambda: router.replica_ids() == ["replica-0"], "the router dropped replica-1")
        assert {router.choose([i % 90 + 3] * 40, 4).replica_id for i in range(10)} == {"replica-0"}

    with_cluster_state(redis_server, actors, body)
