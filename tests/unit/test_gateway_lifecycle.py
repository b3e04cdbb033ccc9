"""How a request's end, however it comes, leaves the gateway and the router: a fake replica
actor (no Ray) streams deltas or raises what Ray raises."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import ray

from kvtide.cluster.gateway import Code, ServingError
from kvtide.cluster.http_api import _respond
from kvtide.cluster.replica_set import ReplicaSet
from kvtide.proto.block_hash import HASH_VERSION
from kvtide.router import ReplicaRegistration, Router
from kvtide.workers.outputs import CompletionDelta
from tests.unit.test_http_api import _gateway


class _Remote:
    def __init__(self, fn) -> None:
        self.remote = fn


class _FakeReplica:
    """``generate`` streams ``steps`` one-token deltas per choice, ``delay_s`` apart, or raises
    ``error`` at the first delta. Records the calls it started and the aborts it got."""

    def __init__(self, steps: int = 3, delay_s: float = 0.05, error: BaseException | None = None) -> None:
        self.steps, self.delay_s, self.error = steps, delay_s, error
        self.started: list[str] = []
        self.aborted: list[str] = []
        self.abort = _Remote(self.aborted.append)
        self.generate = SimpleNamespace(options=lambda **_: _Remote(self._stream))

    def _stream(self, prompt_token_ids, params, request_id):
        self.started.append(request_id)

        async def ref(step: int, index: int) -> CompletionDelta:
            await asyncio.sleep(self.delay_s)
            if self.error is not None:
                raise self.error
            finish = "length" if step == self.steps - 1 else None
            return CompletionDelta(request_id, index, (1,), "", finish_reason=finish)

        async def refs():
            for step in range(self.steps):
                for index in range(params.n):
                    yield ref(step, index)

        return refs()


@pytest.fixture(autouse=True)
def _no_ray_cancel(monkeypatch):
    monkeypatch.setattr(ray, "cancel", lambda stream: None)  # the fake streams are not Ray's


def _routed_gateway(replica: _FakeReplica, **config):
    router = Router("kv_aware", block_size=4)
    router.register(ReplicaRegistration("r0", 4, b"", HASH_VERSION, 100, "tiny"))
    gw = _gateway(**config)
    gw.replicas = ReplicaSet({"r0": replica}, router)
    failed: list[str] = []
    gw.replicas.on_replica_failed = failed.append
    return gw, router, failed


async def _run(gw) -> int:
    n = 0
    async for _ in gw.generate(gw.prepare("hello", {"max_tokens": 3})):
        n += 1
    return n


def test_requests_that_do_not_finish_give_back_their_router_slot():
    """Timed out or closed by the client: the router must not count them in flight forever,
    or the replica looks busier with every such request and routing drifts off it. They are
    counted as aborted."""
    gw, router, _ = _routed_gateway(_FakeReplica(steps=5, delay_s=0.1), request_timeout_s=0.25)

    async def go() -> None:
        for _ in range(3):
            with pytest.raises(ServingError) as err:
                await _run(gw)
            assert err.value.code == Code.DEADLINE_EXCEEDED
        for _ in range(2):
            stream = gw.generate(gw.prepare("hello", {"max_tokens": 3}))
            await anext(stream)
            await stream.aclose()  # a gRPC cancel or HTTP disconnect

    asyncio.run(go())
    assert router.status()["replicas"]["r0"]["in_flight"] == 0
    assert gw.num_in_flight == 0
    assert 'kvtide:request_success_total{finished_reason="abort"} 5.0' in gw.metrics.render().decode()


def test_an_unavailable_replica_is_not_dropped_but_a_dead_one_is():
    """Ray's ActorUnavailableError means "unreachable for now": the request fails and is
    aborted in case it ran, and the replica stays routable. ActorDiedError drops it."""
    blip = ray.exceptions.ActorUnavailableError("network blip", b"\0" * 16)
    gw, router, failed = _routed_gateway(_FakeReplica(error=blip))
    with pytest.raises(ServingError) as err:
        asyncio.run(_run(gw))
    assert err.value.code == Code.UNAVAILABLE and "replica r0 is unavailable" in err.value.message
    assert failed == [] and gw.replicas.actors["r0"].aborted  # still routable; aborted
    assert router.replica_ids() == ["r0"]
    assert 'kvtide:request_success_total{finished_reason="error"} 1.0' in gw.metrics.render().decode()

    gw, _, failed = _routed_gateway(_FakeReplica(error=ray.exceptions.ActorDiedError()))
    with pytest.raises(ServingError):
        asyncio.run(_run(gw))
    assert failed == ["r0"]


def test_a_request_queued_when_drain_begins_is_refused_not_run():
    """When the running request ends during drain (finished, or aborted by drain), the slot
    it frees must not start the queued one on a replica during shutdown."""
    replica = _FakeReplica(steps=10, delay_s=0.05)
    gw, _, _ = _routed_gateway(replica, max_in_flight=1)

    async def go():
        running = asyncio.create_task(_run(gw))  # 10 steps: the fake ignores max_tokens
        await asyncio.sleep(0.02)
        queued = asyncio.create_task(_run(gw))
        await asyncio.sleep(0.02)
        assert gw.num_queued == 1
        await gw.drain(5.0)
        return await asyncio.gather(running, queued, return_exceptions=True)

    running, queued = asyncio.run(go())
    assert running == 10  # it ran on (the fake ignores drain's ray.cancel) and finished
    assert isinstance(queued, ServingError) and queued.code == Code.UNAVAILABLE
    assert "draining" in queued.message
    assert len(replica.started) == 1
    assert gw.num_in_flight == 0 and not gw._slots.locked()


def test_a_client_gone_before_the_first_event_ends_cleanly():
    """The HTTP client hangs up while the request waits for its first token: the request is
    aborted and the handler raises the disconnect, not "generator already running"."""
    replica = _FakeReplica(steps=3, delay_s=2.0)
    gw, _, _ = _routed_gateway(replica)

    class _GoneClient:
        async def is_disconnected(self) -> bool:
            return True

    async def go() -> None:
        stream = gw.generate(gw.prepare("hello", {"max_tokens": 3}))
        body = SimpleNamespace(stream=True, stream_options=None)
        await _respond(_GoneClient(), gw, stream, 1, body, "text_completion", "cmpl")

    with pytest.raises(ServingError, match="the client disconnected"):
        asyncio.run(go())
    assert replica.aborted == replica.started and gw.num_in_flight == 0
