"""``kvtide serve`` under faults, end to end on loopback: two real SmolLM2 replicas, the
embedded Redis and the gRPC frontend. Redis stopped and restarted while requests stream: none
fails and routing returns to exact mode. A replica killed mid-request: that request ends
moves to the other replica and finishes; the dead replica's placement groups are freed and the
supervisor makes it anew.

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


def test_a_killed_replica_moves_its_request_and_is_made_anew(served):
    """The request the killed replica was streaming goes on on the other one (prompt plus the
    tokens so far) and ends whole; the supervisor frees the dead replica's placement groups and
    makes it anew under its id; it is routed to again."""
    srv, client = served
    stream = client.generate("Write a very long story about the tide.", max_tokens=160, min_tokens=160, temperature=0.0)
    first = next(stream)  # the request is running
    victim = first.replica_id
    other = next(iter(set(srv.gateway.replicas.handles) - {victim}))
    old_actor, gen = srv.gateway.replicas.handles[victim].actor, srv._generation[victim]

    def groups(g: int) -> set[str]:
        prefix = f"{srv.placement_owner}/{victim}/g{g}/"
        return {p["state"] for p in placement_group_table().values() if p["name"].startswith(prefix)}

    assert groups(gen) == {"CREATED"}  # its shard's group, named so the server can find it
    ray.kill(old_actor, no_restart=True)
    rest = list(stream)
    assert rest[-1].finish_reason == "length"
    assert sum(len(r.token_ids) for r in (first, *rest)) == 160
    assert other in {r.replica_id for r in rest}
    assert srv.gateway.metrics.migrations._value.get() >= 1
    # Ray keeps a dead actor's placement groups until the job ends; the server frees them.
    wait_for(lambda: groups(gen) <= {"REMOVED"}, "the dead replica's CPUs given back", timeout_s=30)
    # The supervisor makes it anew (after its backoff) and routes to it once it is healthy.
    wait_for(lambda: srv._generation[victim] == gen + 1 and victim in modes(srv), "the replica made anew",
             timeout_s=180)  # fmt: skip
    assert srv.gateway.replicas.handles[victim].actor is not old_actor
    assert groups(gen + 1) == {"CREATED"}
    assert srv.supervisor.num_recreations == 1
    assert srv.supervisor.replica_states()[victim] == "serving"
    served_by: set[str] = set()
    threads = [threading.Thread(target=lambda i=i: served_by.update(
        r.replica_id for r in client.generate(f"After the kill {i}", max_tokens=16, min_tokens=16, temperature=0.0)
    )) for i in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert served_by - {""} == {victim, other}
