"""The cluster as a frontend sees it, as the proto message the status API returns and the state
store keeps (``ClusterStatusResponse``), built from the router's typed status."""

from __future__ import annotations

from dataclasses import dataclass

from kvtide.cluster.state.codec import load_to_proto
from kvtide.cluster.state.health import ReplicaHealth
from kvtide.proto import kvtide_pb2 as pb
from kvtide.router import RouterStatus


@dataclass(frozen=True)
class StoreStatus:
    url: str | None
    up: bool
    num_outages: int
    num_resyncs: int


def overall_mode(status: RouterStatus | None) -> str:
    """"exact" or "approximate" when every replica agrees, else "mixed"; "" without a router."""
    modes = {r.mode.value for r in status.replicas} if status else set()
    return modes.pop() if len(modes) == 1 else "mixed" if modes else ""


def cluster_status(
    router: RouterStatus | None,
    store: StoreStatus | None = None,
    *,
    num_queued: int = 0,
    num_in_flight: int = 0,
    draining: bool = False,
    health: dict[str, ReplicaHealth] | None = None,
) -> pb.ClusterStatusResponse:
    reply = pb.ClusterStatusResponse(
        routing_policy=router.policy if router else "round_robin", routing_mode=overall_mode(router),
        num_queued=num_queued, num_in_flight=num_in_flight, draining=draining,
    )  # fmt: skip
    for r in router.replicas if router else ():
        reply.replicas.add(
            replica_id=r.replica_id, routing_mode=r.mode.value, load=load_to_proto(r.replica_id, r.load),
            in_flight=r.in_flight, blocks_indexed=r.blocks_indexed, blocks_guessed=r.blocks_guessed,
        )  # fmt: skip
    for rid, h in sorted((health or {}).items()):
        reply.health.add(replica_id=rid, state=h.state.value, healthy=h.healthy, reason=h.reason,
                         num_restarts=h.num_restarts)  # fmt: skip
    if store is not None:
        reply.state_store.CopyFrom(
            pb.StateStoreStatus(url=store.url or "", up=store.up, num_outages=store.num_outages,
                                num_resyncs=store.num_resyncs)  # fmt: skip
        )
    return reply
