"""``Fleet`` (cluster/fleet.py) on a fake server: drains take a replica out of routing at once and
stop it only when its requests finished or the bounded drain timeout passed; rolls make the
new replicas before draining the old; a failed start is counted, not raised."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from kvtide.cluster.autoscaler.actions import Actions
from kvtide.cluster.autoscaler.profile import EngineProfile
from kvtide.cluster.fleet import Fleet, engine_for_profile
from kvtide.cluster.serve_config import ServeConfig
from kvtide.workers import EngineConfig

PROFILES = {
    "old": EngineProfile("old", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64),
    "new": EngineProfile("new", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=128, tp=2),
    "odd": EngineProfile("odd", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64, block_size=32),
}


class FakeServer:
    """What ``Fleet`` uses of ``Server``, recording the order of what happens."""

    def __init__(self, n: int = 2) -> None:
        self.config = ServeConfig(engine=EngineConfig.from_kwargs(model="m", max_num_seqs=2))
        self._actors = {f"replica-{i}": object() for i in range(n)}
        self.gateway = SimpleNamespace(_active={}, limits=SimpleNamespace(max_model_len=512))
        self.unhealthy: set[str] = set()
        self._state = SimpleNamespace(router=SimpleNamespace(block_size=16), set_healthy=self._set_healthy)
        self.watched = set(self._actors)
        self.supervisor = SimpleNamespace(watch=self.watched.add, unwatch=self.watched.discard)
        self.events: list[str] = []
        self.start_delay_s = 0.05
        self.fail_starts = False

    def _set_healthy(self, rid: str, healthy: bool) -> None:
        (self.unhealthy.discard if healthy else self.unhealthy.add)(rid)

    def routed(self) -> set[str]:
        return set(self._actors) - self.unhealthy

    async def add_replica(self, rid: str, resolved) -> None:
        await asyncio.sleep(self.start_delay_s)
        if self.fail_starts:
            raise RuntimeError("no room for the shards")
        self._actors[rid] = resolved
        self.watched.add(rid)
        self.events.append(f"ready {rid}")

    async def remove_replica(self, rid: str) -> None:
        self.events.append(f"stop {rid} with {len(self.routed())} routed")
        self.watched.discard(rid)
        self._actors.pop(rid)

    def forget_replica(self, rid: str) -> None:
        self.events.append(f"forget {rid}")


def request_on(server: FakeServer, rid: str, name: str) -> None:
    server.gateway._active[name] = SimpleNamespace(routed=SimpleNamespace(replica_id=rid))


def fleet(server: FakeServer, **kwargs) -> Fleet:
    kwargs = {"drain_timeout_s": 5.0, "forget_after_s": 0.03, "poll_s": 0.01, **kwargs}
    return Fleet(server, PROFILES, "old", resolve=lambda engine: engine, **kwargs)


def test_a_drained_replica_leaves_routing_at_once_and_stops_when_its_requests_finish():
    async def main():
        server = FakeServer()
        f = fleet(server)
        request_on(server, "replica-0", "a")
        f.drain("replica-0")
        assert server.routed() == {"replica-1"} and "replica-0" not in server.watched
        assert [v.state for v in f.views()] == ["draining", "ready"]
        assert f.views()[0].num_in_flight == 1
        await asyncio.sleep(0.1)
        assert server.events == []  # still waiting for its request
        del server.gateway._active["a"]
        await f.drain_and_stop("replica-0")
        assert server.events == ["stop replica-0 with 1 routed"]  # and forgotten after forget_after_s
        await asyncio.sleep(0.1)
        assert server.events[-1] == "forget replica-0"
        assert [v.replica_id for v in f.views()] == ["replica-1"]

    asyncio.run(main())


def test_the_drain_wait_is_bounded(caplog):
    async def main():
        server = FakeServer()
        f = fleet(server, drain_timeout_s=0.2)
        request_on(server, "replica-0", "stuck")
        await asyncio.wait_for(f.drain_and_stop("replica-0"), 5.0)
        assert server.events[0] == "stop replica-0 with 1 routed"

    asyncio.run(main())
    assert "still has 1 request(s) after the 0.2 s drain; they move to other replicas" in caplog.text


def test_an_undrained_replica_is_routed_and_supervised_again():
    async def main():
        server = FakeServer()
        f = fleet(server)
        request_on(server, "replica-0", "a")
        f.apply(Actions(drain=("replica-0",)))
        f.apply(Actions(undrain=("replica-0",)))
        await asyncio.sleep(0.05)
        assert server.routed() == {"replica-0", "replica-1"} and "replica-0" in server.watched
        assert [v.state for v in f.views()] == ["ready", "ready"] and server.events == []

    asyncio.run(main())


def test_a_roll_makes_the_new_replicas_before_it_drains_the_old_and_keeps_the_floor():
    async def main():
        server = FakeServer()
        f = fleet(server)
        await f.roll("new", count=2, floor=2)
        assert server.events[:2] == ["ready replica-2", "ready replica-3"]
        # Each old one stops with the other three (then two) still routed: never below 2.
        stops = [e for e in server.events[2:] if not e.startswith("forget")]
        assert stops == ["stop replica-0 with 3 routed", "stop replica-1 with 2 routed"]
        assert sorted((v.profile, v.state) for v in f.views()) == [("new", "ready")] * 2
        assert f.cold_start_s is not None and f.cold_start_s >= 0.05

    asyncio.run(main())


def test_a_roll_keeps_an_old_replica_that_the_floor_needs(caplog):
    async def main():
        server = FakeServer()
        f = fleet(server)
        await f.roll("new", count=1, floor=2)
        assert [e for e in server.events if e.startswith("stop")] == ["stop replica-0 with 2 routed"]
        assert sorted(v.profile for v in f.views()) == ["new", "old"]

    asyncio.run(main())
    assert "replica-1 stays: draining it would leave 1 ready, below the floor 2" in caplog.text


def test_a_failed_start_is_counted_and_forgotten_not_raised(caplog):
    async def main():
        server = FakeServer()
        server.fail_starts = True
        f = fleet(server)
        f.apply(Actions(start={"new": 1}))
        assert [v.state for v in f.views()] == ["ready", "ready", "starting"]
        await asyncio.sleep(0.2)
        assert len(f.views()) == 2 and f.num_failed_starts == 1
        f.apply(Actions(start={"odd": 1}))
        await asyncio.sleep(0.05)
        assert f.num_failed_starts == 2

    asyncio.run(main())
    assert "replica-2 (new) did not start: no room for the shards" in caplog.text
    assert "block_size 32 differs from the serving replicas' 16" in caplog.text


def test_a_cancelled_start_leaves_the_fleet():
    async def main():
        server = FakeServer()
        server.start_delay_s = 10.0
        f = fleet(server)
        rid = f.start("new")
        await asyncio.sleep(0.01)
        f.apply(Actions(cancel=(rid,)))
        await asyncio.sleep(0.01)
        assert [v.replica_id for v in f.views()] == ["replica-0", "replica-1"]
        await f.close(timeout_s=1.0)

    asyncio.run(main())


def test_a_profile_sizes_the_servers_engine():
    base = EngineConfig.from_kwargs(model="m", max_num_seqs=2, enable_prefix_caching=False)
    engine = engine_for_profile(base, PROFILES["new"])
    assert engine.model.model == "m" and engine.cache.enable_prefix_caching is False
    assert engine.scheduler.max_num_seqs == 8 and engine.scheduler.max_num_batched_tokens == 128
    assert engine.parallel.tensor_parallel_size == 2
    with pytest.raises(ValueError, match="initial_profile: 'nope' is not in profiles"):
        Fleet(FakeServer(), PROFILES, "nope")


def test_the_supervisor_leaves_an_unwatched_replica_alone():
    """A replica the fleet drains is unwatched: a health check in flight when that happens does
    not put it back in routing, and its actor's death (the fleet stopped it) is not a crash to
    make anew. A replica the fleet adds is watched like the others."""
    from tests.unit.test_supervisor import Fleet as SupervisedPair
    from tests.unit.test_supervisor import FakeActor, _Method

    async def main():
        pair = SupervisedPair()
        sup = pair.supervisor
        await sup.check_once()
        healthy = pair.actors["r0"].health

        async def slow_healthy():  # its next answer, healthy, comes after it was unwatched
            await asyncio.sleep(0.1)
            return healthy

        pair.actors["r0"].check_health = _Method(slow_healthy)
        check = asyncio.create_task(sup.check_once())
        await asyncio.sleep(0.05)
        sup.unwatch("r0")
        pair.state.set_healthy("r0", False)  # what the fleet's drain does
        await check
        assert pair.routed() == ["r1"] and "r0" not in sup.health()
        pair.actors["r0"] = FakeActor("r0#0")
        pair.actors["r0"].dead = True  # stopped
        await sup.check_once()
        await asyncio.sleep(0.1)
        assert pair.made == 0 and pair.lost == [] and pair.routed() == ["r1"]

        pair.actors["r2"] = FakeActor("r2#0")
        sup.watch("r2")
        await sup.check_once()
        assert sup.health()["r2"].healthy

    asyncio.run(main())
