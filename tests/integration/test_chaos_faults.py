"""Issue 15's fault criteria, end to end on loopback: two SmolLM2 replicas behind the gRPC
frontend (embedded Redis), on the session's Ray cluster plus two one-CPU nodes of this module's
own. While the server starts, the session's nodes are filled, so each replica's shard lands on
one of the module's nodes: one of them can be removed without touching the frontend.

- a shard process SIGKILLed under load: every request in flight ends with the greedy tokens of
  an undisturbed run, or with UNAVAILABLE; the replica restarts its shards and serves again;
- a node removed (``Cluster.remove_node``) under load: the same;
- a replica whose every new incarnation crashes on start: the supervisor gives up after
  ``max_recreations`` and reports it broken in ClusterStatus and in /metrics (runs last: it
  leaves that replica broken).

Every wait is bounded: request threads are joined with a timeout and a thread still alive fails
the test (a hang).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import grpc
import httpx
import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kvtide.cluster.client import KvtideClient
from kvtide.cluster.replica.actor import Replica
from kvtide.cluster.serve import Server, ServeConfig
from kvtide.cluster.state.health import SupervisionConfig
from kvtide.workers import EngineConfig, EngineRequest, SamplingParams
from tests.integration.test_serving import _LoopThread, wait_for

pytestmark = pytest.mark.slow

TIMEOUT_S = 180.0
NUM_TOKENS = 32
PROMPTS = [f"Chaos request {i}: describe the tide at dawn." for i in range(4)]
GREEDY = {"max_tokens": NUM_TOKENS, "min_tokens": NUM_TOKENS, "temperature": 0.0}


@ray.remote(num_cpus=0)
class _Blocker:
    """Holds a node's CPUs while the server starts (its resources are given in ``options``)."""

    def ready(self) -> bool:
        return True


@pytest.fixture(scope="module")
def chaos(cluster):
    """(server, client, the module's two nodes, the greedy reference of each prompt)."""
    session_nodes = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
    own = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
    cluster.wait_for_nodes()
    blockers = [
        _Blocker.options(num_cpus=cpus, scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False)).remote()
        for nid, cpus in session_nodes.items() if cpus
    ]  # fmt: skip
    ray.get([b.ready.remote() for b in blockers], timeout=60)
    config = ServeConfig(
        num_replicas=2,
        grpc_port=0,
        http_port=0,
        engine=EngineConfig.from_kwargs(num_blocks=256, max_model_len=1024, max_num_seqs=4),
        stats_interval_s=0.2,
        supervision=SupervisionConfig(interval_s=0.5, backoff_s=0.5, max_recreations=2),
    )
    runner, srv = _LoopThread(), Server(config)
    try:
        runner.run(srv.start(), timeout_s=600)
        for b in blockers:  # restarted shards may now go anywhere
            ray.kill(b)
        blockers = []
        with KvtideClient(f"127.0.0.1:{srv.grpc_port}", timeout_s=TIMEOUT_S) as client:
            reference = {p: list(client.complete(p, **GREEDY).token_ids) for p in PROMPTS}
            yield srv, client, own, reference
    finally:
        runner.run(srv.stop(drain_timeout_s=1.0), timeout_s=180)
        runner.close()
        for b in blockers:
            ray.kill(b)
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        for node in own:
            if node.node_id in alive:
                cluster.remove_node(node)


def actor_of(srv, rid: str):
    return srv.gateway.replicas.handles[rid].actor


def shard_nodes(srv) -> dict[str, str]:
    """replica id -> the node of its (one) shard."""
    return {rid: next(iter(ray.get(actor_of(srv, rid).shard_nodes.remote(), timeout=30).values()))
            for rid in srv.gateway.replicas.handles}  # fmt: skip


def shard_node_if_alive(srv, rid: str) -> str | None:
    """The node of the replica's shard, or None while its actor is dead or not answering (not yet
    made anew)."""
    try:
        return next(iter(ray.get(actor_of(srv, rid).shard_nodes.remote(), timeout=30).values()))
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


def under_load(client, reference: dict[str, list[int]], fault) -> list[tuple[str, object]]:
    """Every prompt streamed at once; ``fault(replica_ids)`` runs once each stream has its first
    token (it gets the replica each started on). Returns (prompt, tokens or gRPC error) each."""
    outcomes: dict[str, object] = {}
    started: dict[str, str] = {}
    first = threading.Barrier(len(reference) + 1)

    def one(prompt: str) -> None:
        tokens: list[int] = []
        try:
            for i, delta in enumerate(client.generate(prompt, **GREEDY)):
                tokens.extend(delta.token_ids)
                if i == 0:
                    started[prompt] = delta.replica_id
                    with contextlib.suppress(threading.BrokenBarrierError):  # another failed first
                        first.wait(TIMEOUT_S)
            outcomes[prompt] = tokens
        except grpc.RpcError as exc:
            outcomes[prompt] = exc
        finally:
            if prompt not in started:
                first.abort()

    threads = [threading.Thread(target=one, args=(p,), daemon=True) for p in reference]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        first.wait(TIMEOUT_S)
    fault(set(started.values()))
    for t in threads:
        t.join(TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a request hung past its bound"
    return [(p, outcomes[p]) for p in reference]


def migrations(srv) -> int:
    return int(srv.gateway.metrics.migrations._value.get())


def assert_whole_or_retryable(srv, outcomes, reference, migrations_before: int) -> None:
    """Each outcome is the undisturbed greedy run's tokens, or UNAVAILABLE; and the fault hit
    at least one of them (it moved to the other replica, or failed retryably)."""
    failed = 0
    for prompt, out in outcomes:
        if isinstance(out, grpc.RpcError):
            assert out.code() == grpc.StatusCode.UNAVAILABLE, (prompt, out.code(), out.details())
            failed += 1
        else:
            assert out == reference[prompt], prompt
    assert failed or migrations(srv) > migrations_before, "the fault hit no request in flight"


def serves_directly(srv, rid: str) -> bool:
    """A 4-token greedy request through the replica's own engine and shards (no routing)."""
    request = EngineRequest(f"after-{rid}-{os.urandom(4).hex()}", (1, 2, 3, 4), SamplingParams(temperature=0.0, max_tokens=4))
    refs = actor_of(srv, rid).generate.options(num_returns="streaming").remote(request)
    deltas = [ray.get(ref, timeout=TIMEOUT_S) for ref in refs]
    return sum(len(d.token_ids) for d in deltas) == 4 and deltas[-1].finish_reason == "length"


def test_a_shard_sigkilled_under_load_loses_no_request_and_its_replica_serves_again(chaos):
    srv, client, _, reference = chaos
    killed: dict[str, int] = {}

    def kill_a_shard(busy: set[str]) -> None:
        victim = sorted(busy)[0]
        killed["restarts"] = ray.get(actor_of(srv, victim).num_restarts.remote(), timeout=30)
        (pid,) = ray.get(actor_of(srv, victim).shard_pids.remote(), timeout=30).values()
        killed["rid"], killed["pid"] = victim, pid
        os.kill(pid, signal.SIGKILL)

    before = migrations(srv)
    outcomes = under_load(client, reference, kill_a_shard)
    assert_whole_or_retryable(srv, outcomes, reference, before)
    victim = killed["rid"]
    wait_for(lambda: ray.get(actor_of(srv, victim).num_restarts.remote(), timeout=30) == killed["restarts"] + 1,
             "the killed shard's replica restarted its shards", timeout_s=TIMEOUT_S)  # fmt: skip
    assert killed["pid"] not in ray.get(actor_of(srv, victim).shard_pids.remote(), timeout=30).values()
    wait_for(lambda: srv.supervisor.replica_states()[victim] == "serving"
             and srv.supervisor.health()[victim].healthy, "the replica healthy again", timeout_s=TIMEOUT_S)  # fmt: skip
    assert serves_directly(srv, victim)
    assert list(client.complete(PROMPTS[0], **GREEDY).token_ids) == reference[PROMPTS[0]]


def test_a_node_removed_under_load_loses_no_request_and_its_replica_serves_again(chaos, cluster):
    srv, client, own, reference = chaos
    by_node = {node.node_id: node for node in own}
    hosted = {rid: nid for rid, nid in shard_nodes(srv).items() if nid in by_node}
    assert hosted, "no replica's shard on a removable node"
    removed: dict[str, str] = {}

    def remove_a_node(busy: set[str]) -> None:
        victim = sorted(busy & set(hosted) or hosted)[0]
        removed["rid"], removed["node"] = victim, hosted[victim]
        cluster.remove_node(by_node[hosted[victim]])

    before = migrations(srv)
    outcomes = under_load(client, reference, remove_a_node)
    assert_whole_or_retryable(srv, outcomes, reference, before)
    victim, gone = removed["rid"], removed["node"]
    assert gone not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    # The supervisor's last verdict may predate the node's loss (its actor may have been there
    # too): wait for one from an actor whose shard is on a live node.
    wait_for(lambda: srv.supervisor.replica_states()[victim] == "serving" and srv.supervisor.health()[victim].healthy
             and shard_node_if_alive(srv, victim) not in (None, gone),
             "the replica healthy again on another node", timeout_s=TIMEOUT_S)  # fmt: skip
    assert serves_directly(srv, victim)
    assert list(client.complete(PROMPTS[1], **GREEDY).token_ids) == reference[PROMPTS[1]]


class CrashingReplica(Replica):
    """A replica whose process exits while it starts (every incarnation)."""

    def __init__(self, spec) -> None:
        os._exit(3)


def test_a_replica_crashing_on_every_start_is_given_up_after_max_recreations_and_reported_broken(chaos, monkeypatch):
    srv, client, _, reference = chaos
    # The one made anew least often so far (a node removal may have taken a replica actor too):
    # the breaker counts every death within its window.
    prior = {rid: len(w.recreations) for rid, w in srv.supervisor.watches.items()}
    victim = min(sorted(prior), key=prior.get)
    (other,) = set(prior) - {victim}
    expected = srv.supervisor.config.max_recreations - prior[victim]
    assert expected >= 1, prior
    made = []
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this module
    crashing = ray.remote(CrashingReplica)
    real_new_actor = srv._new_actor

    def new_actor(rid: str):
        if rid != victim:
            return real_new_actor(rid)
        made.append(rid)
        srv._generation[rid] += 1
        return crashing.options(num_cpus=0).remote(None)

    monkeypatch.setattr(srv, "_new_actor", new_actor)
    before = srv.supervisor.num_recreations
    ray.kill(actor_of(srv, victim), no_restart=True)
    wait_for(lambda: srv.supervisor.replica_states()[victim] == "broken", "the crash-loop breaker", timeout_s=TIMEOUT_S)
    assert len(made) == expected  # each new incarnation crashed on start; then it was given up
    assert srv.supervisor.num_recreations == before  # none of them came up
    health = {h.replica_id: h for h in client.cluster_status().health}
    assert health[victim].state == "broken" and not health[victim].healthy
    assert "crash-loop breaker" in health[victim].reason
    assert health[other].state == "serving" and health[other].healthy
    metrics = httpx.get(f"http://127.0.0.1:{srv.http_port}/metrics", timeout=30).text
    assert f'kvtide:replica_up{{replica="{victim}",state="broken"}} 0.0' in metrics
    assert f'kvtide:replica_up{{replica="{other}",state="serving"}} 1.0' in metrics
    # The other replica serves every request meanwhile.
    for prompt in PROMPTS[:2]:
        out = client.complete(prompt, **GREEDY)
        assert list(out.token_ids) == reference[prompt]
    time.sleep(4 * srv.supervisor.interval_s)  # several checks later: still not made anew
    assert len(made) == expected and srv.supervisor.replica_states()[victim] == "broken"
