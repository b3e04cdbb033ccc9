"""How a request's end, however it comes, leaves the gateway and the router: fake replica
handles (no Ray) stream deltas or raise what a handle raises."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from kvtide.cluster.frontend.errors import Code, ServingError
from kvtide.cluster.frontend.handles import ReplicaGone, ReplicaUnreachable
from kvtide.cluster.frontend.http_render import respond
from tests.unit.frontend_fakes import FakeReplica, routed_gateway


def _routed_gateway(replica: FakeReplica, **config):
    gw, state, lost = routed_gateway(replica, **config)
    return gw, state.router, lost


async def _run(gw) -> int:
    n = 0
    async for _ in gw.generate(await gw.prepare("hello", {"max_tokens": 3})):
        n += 1
    return n


def test_requests_that_do_not_finish_give_back_their_router_slot():
    """Timed out or closed by the client: the router must not count them in flight forever,
    or the replica looks busier with every such request and routing drifts off it. They are
    counted as aborted."""
    gw, router, _ = _routed_gateway(FakeReplica(tokens=(1,) * 5, delay_s=0.1), request_timeout_s=0.25)

    async def go() -> None:
        for _ in range(3):
            with pytest.raises(ServingError) as err:
                await _run(gw)
            assert err.value.code == Code.DEADLINE_EXCEEDED
        for _ in range(2):
            stream = gw.generate(await gw.prepare("hello", {"max_tokens": 3}))
            await anext(stream)
            await stream.aclose()  # a gRPC cancel or HTTP disconnect

    asyncio.run(go())
    assert router.status().replica("r0").in_flight == 0
    assert gw.admission.num_in_flight == 0
    assert 'kvtide:request_success_total{finished_reason="abort"} 5.0' in gw.metrics.render().decode()


def test_an_unavailable_replica_is_not_dropped_but_a_dead_one_is():
    """Unreachable for now: the request fails and is aborted in case it ran, and the replica
    stays routable. Dead: it leaves routing at once and its owner hears it."""
    blip = ReplicaUnreachable("replica r0 is unavailable: network blip")
    gw, router, lost = _routed_gateway(FakeReplica(error=blip))
    with pytest.raises(ServingError) as err:
        asyncio.run(_run(gw))
    assert err.value.code == Code.UNAVAILABLE and "replica r0 is unavailable" in err.value.message
    assert lost == [] and gw.replicas.handles["r0"].aborted  # still routable; aborted
    assert router.replica_ids() == ["r0"]
    assert 'kvtide:request_success_total{finished_reason="error"} 1.0' in gw.metrics.render().decode()

    gw, router, lost = _routed_gateway(FakeReplica(error=ReplicaGone("replica r0 is dead")))
    with pytest.raises(ServingError) as err:
        asyncio.run(_run(gw))
    assert err.value.code == Code.UNAVAILABLE
    assert lost == ["r0"] and router.replica_ids() == []


def test_a_request_queued_when_drain_begins_is_refused_not_run():
    """When the running request ends during drain (finished, or aborted by drain), the slot
    it frees must not start the queued one on a replica during shutdown."""
    replica = FakeReplica(tokens=(1,) * 10, delay_s=0.05)
    gw, _, _ = _routed_gateway(replica, max_in_flight=1)

    async def go():
        running = asyncio.create_task(_run(gw))  # 10 steps: the fake ignores max_tokens
        await asyncio.sleep(0.02)
        queued = asyncio.create_task(_run(gw))
        await asyncio.sleep(0.02)
        assert gw.admission.num_queued == 1
        await gw.drain(5.0)
        return await asyncio.gather(running, queued, return_exceptions=True)

    running, queued = asyncio.run(go())
    assert running == 10  # it finished within the drain timeout
    assert isinstance(queued, ServingError) and queued.code == Code.UNAVAILABLE
    assert "draining" in queued.message
    assert len(replica.started) == 1
    assert gw.admission.num_in_flight == 0 and not gw.admission._slots.locked()


def test_a_client_gone_before_the_first_event_ends_cleanly():
    """The HTTP client hangs up while the request waits for its first token: the request is
    aborted and the handler raises the disconnect, not "generator already running"."""
    replica = FakeReplica(delay_s=2.0)
    gw, _, _ = _routed_gateway(replica)

    class _GoneClient:
        async def is_disconnected(self) -> bool:
            return True

    async def go() -> None:
        stream = gw.generate(await gw.prepare("hello", {"max_tokens": 3}))
        body = SimpleNamespace(stream=True, stream_options=None)
        await respond(_GoneClient(), gw, stream, 1, body, "text_completion", "cmpl")

    with pytest.raises(ServingError, match="the client disconnected"):
        asyncio.run(go())
    assert [rid for rid, _ in replica.aborted] == replica.started and gw.admission.num_in_flight == 0
