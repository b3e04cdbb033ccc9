"""``kvtide serve`` under faults, end to end on loopback: two real SmolLM2 replicas, the
embedded Redis and the gRPC frontend. Redis stopped and restarted while requests stream: none
fails and routing returns to exact mode. A replica killed mid-request: that request ends
with a clear error, the next requests are served by the other replica, and the dead
replica's placement groups are freed.

The replica test kills a replica, so it runs last (this module's server is its own).
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import ray
from ray.util.placement_group import placement_group_table

from kvtide.cluster.client import KvtideClient
from kvtide.cluster.state.redis_server import start_redis
from kvtide.cluster.serve import Server, ServeConfig
from kvtide.workers import EngineConfig
from tests.integration.test_serving import _LoopThread, wait_for

pytestmark = pytest.mark.slow

TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def served(cluster):
    config = ServeConfig(
        num_replicas=2,
        grpc_port=0,
        http_port=0,
        engine=EngineConfig.from_kwargs(num_blocks=256, max_model_len=1024, max_num_seqs=4),
        stats_interval_s=0.2,
    )
    runner = _LoopThread()
    srv = Server(config)
    runner.run(srv.start(), timeout_s=600)
    try:
        with KvtideClient(f"127.0.0.1:{srv.grpc_port}", timeout_s=TIMEOUT_S) as client:
            yield srv, client
    finally:
        runner.run(srv.stop(drain_timeout_s=1.0), timeout_s=120)
        runner.close()


def modes(srv) -> dict[str, str]:
    return {r.replica_id: r.mode.value for r in srv.gateway.replicas.routing_status().replicas}


def test_redis_stopped_and_restarted_under_load_fails_no_request_and_routing_returns_to_exact(served):
    srv, client = served
    wait_for(lambda: set(modes(srv).values()) == {"exact"}, "exact routing at start")
    results, errors = [], []

    def one(i: int) -> None:
        try:
            results.append(client.complete(f"Request {i}: tell me about the sea.", max_tokens=24, min_tokens=24, temperature=0.0))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    port = srv._redis.port
    srv._redis.stop()  # mid-stream: every request above is queued or running
    # Without events the router cannot know the caches: it routes on its own guesses.
    wait_for(lambda: "approximate" in modes(srv).values(), "approximate routing while Redis is down", timeout_s=10)
    time.sleep(1.0)
    srv._redis = start_redis(port=port)
    for t in threads:
        t.join(TIMEOUT_S)
    assert not errors, errors
    assert [r.finish_reason for r in results] == ["length"] * 6
    assert all(len(r.token_ids) == 24 for r in results)
    # Back to exact: the ClusterState sees Redis again and resyncs each replica's snapshot.
    wait_for(lambda: set(modes(srv).values()) == {"exact"}, "exact routing after Redis returned", timeout_s=30)
    again = client.complete("Request 0: tell me about the sea.", max_tokens=4, temperature=0.0)
    assert again.finish_reason == "length"


def test_a_killed_replica_fails_its_request_clearly_and_the_other_serves(served):
    srv, client = served
    stream = client.generate("Write a very long story about the tide.", max_tokens=900, min_tokens=900, temperature=0.0)
    first = next(stream)  # the request is running
    victim = first.replica_id
    assert victim in srv.gateway.replicas.handles

    def victim_groups() -> set[str]:
        prefix = f"{srv.placement_owner}/{victim}/"
        return {g["state"] for g in placement_group_table().values() if g["name"].startswith(prefix)}

    assert victim_groups() == {"CREATED"}  # its shard's group, named so the server can find it
    ray.kill(srv.gateway.replicas.handles[victim].actor, no_restart=True)
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream:
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"replica {victim} is unavailable" in info.value.details()
    # The router drops it at once (reported failed) or when its heartbeat expires (seconds).
    wait_for(lambda: victim not in modes(srv), "the killed replica leaving the router", timeout_s=10)
    # Ray keeps a dead actor's placement groups until the job ends; the server frees them.
    wait_for(lambda: victim_groups() <= {"REMOVED"}, "the dead replica's CPUs given back", timeout_s=30)
    for i in range(3):
        responses = list(client.generate(f"After the kill {i}", max_tokens=4, temperature=0.0))
        assert responses[-1].finish_reason == "length"
        assert {r.replica_id for r in responses} - {""} == {next(iter(set(srv.gateway.replicas.handles) - {victim}))}
