"""The frontend's supervisor with fake replica actors (no Ray processes): an unfit replica leaves
routing and comes back, a dead one is made anew after a backoff, the crash-loop breaker stops
recreating one that keeps dying, and health follows whether any replica is healthy."""

from __future__ import annotations

import asyncio

import pytest
import ray

from kvtide.cluster.frontend.cluster_state import ClusterState
from kvtide.cluster.state.health import ReplicaHealth, ReplicaState, SupervisionConfig
from kvtide.cluster.supervisor import Supervisor
from kvtide.proto.block_hash import HASH_VERSION
from kvtide.router import ReplicaRegistration, Router

FAST = SupervisionConfig(interval_s=0.01, check_timeout_s=0.2, backoff_s=0.01, max_backoff_s=0.05,
                         max_recreations=2, window_s=60.0)  # fmt: skip


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class FakeActor:
    """Answers check_health with ``health``, or raises ``ActorDiedError`` once ``dead``."""

    def __init__(self, name: str, health: ReplicaHealth | None = None) -> None:
        self.name, self.dead, self.hang = name, False, False
        self.health = health or ReplicaHealth(ReplicaState.SERVING, True)
        self.check_health = _Method(self._check)

    async def _check(self):
        if self.dead:
            raise ray.exceptions.ActorDiedError()
        if self.hang:
            await asyncio.sleep(10)
        return self.health


def _registration(rid: str, incarnation: str) -> ReplicaRegistration:
    return ReplicaRegistration(rid, 4, b"", HASH_VERSION, 16, "m", incarnation=incarnation)


class Fleet:
    """Two replicas registered directly with a real ClusterState; ``recreate`` makes a fresh fake
    actor (or raises, while ``fail_recreate``)."""

    def __init__(self) -> None:
        self.state = ClusterState(Router("least_loaded", block_size=4), {}, None)
        self.actors = {rid: FakeActor(f"{rid}#0") for rid in ("r0", "r1")}
        for rid in self.actors:
            self.state.register(_registration(rid, f"{rid}#0"))
        self.lost: list[str] = []
        self.state.on_replica_lost = self.lost.append
        self.serving: list[bool] = []
        self.made, self.fail_recreate = 0, False
        self.supervisor = Supervisor(self.state, self.actors, self.recreate, self.on_serving, FAST)

    async def recreate(self, rid: str) -> FakeActor:
        if self.fail_recreate:
            raise RuntimeError("no resources")
        self.made += 1
        actor = FakeActor(f"{rid}#{self.made}")
        self.state.register(_registration(rid, actor.name))
        return actor

    async def on_serving(self, serving: bool) -> None:
        self.serving.append(serving)

    def routed(self) -> list[str]:
        return sorted(self.state.router.replica_ids())

    async def settle(self) -> None:
        """Until no recreation is under way."""
        for _ in range(200):
            if all(w.recreating is None for w in self.supervisor.watches.values()):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("a recreation did not finish")


def test_healthy_replicas_stay_routed_and_health_says_serving_once():
    async def main() -> None:
        fleet = Fleet()
        await fleet.supervisor.check_once()
        await fleet.supervisor.check_once()
        assert fleet.routed() == ["r0", "r1"]
        assert fleet.serving == [True]
        assert fleet.supervisor.replica_states() == {"r0": "serving", "r1": "serving"}

    asyncio.run(main())


@pytest.mark.parametrize("trouble", ["unfit", "hang"])
def test_an_unfit_or_silent_replica_leaves_routing_and_comes_back_when_healthy(trouble):
    async def main() -> None:
        fleet = Fleet()
        r0 = fleet.actors["r0"]
        if trouble == "unfit":
            r0.health = ReplicaHealth(ReplicaState.RESTARTING, False, "its shards are restarting")
        else:
            r0.hang = True
        await fleet.supervisor.check_once()
        assert fleet.routed() == ["r1"]
        assert fleet.serving == [True]  # one replica is still healthy
        assert fleet.supervisor.replica_states()["r0"] == ("restarting" if trouble == "unfit" else "serving")
        assert "r0" in fleet.state.unhealthy
        assert fleet.lost == []  # unfit is not lost: its placement stays, it is not made anew
        r0.health, r0.hang = ReplicaHealth(ReplicaState.SERVING, True), False
        await fleet.supervisor.check_once()
        assert fleet.routed() == ["r0", "r1"]
        assert fleet.made == 0

    asyncio.run(main())


def test_a_dead_replica_is_reported_lost_made_anew_and_routed_again():
    async def main() -> None:
        fleet = Fleet()
        old = fleet.actors["r0"]
        old.dead = True
        await fleet.supervisor.check_once()
        assert fleet.routed() == ["r1"]
        assert fleet.lost == ["r0"]
        assert fleet.supervisor.replica_states()["r0"] == "dead"
        await fleet.settle()
        assert fleet.actors["r0"] is not old and fleet.actors["r0"].name == "r0#1"
        assert fleet.routed() == ["r1"]  # registered, but routed only once its health check passes
        await fleet.supervisor.check_once()
        assert fleet.routed() == ["r0", "r1"]
        assert fleet.state.router.registration("r0").incarnation == "r0#1"
        assert fleet.supervisor.num_recreations == 1

    asyncio.run(main())


def test_the_crash_loop_breaker_gives_up_after_max_recreations_and_says_why():
    async def main() -> None:
        fleet = Fleet()
        for _ in range(FAST.max_recreations):
            fleet.actors["r0"].dead = True
            await fleet.supervisor.check_once()
            await fleet.settle()
            await fleet.supervisor.check_once()
        assert fleet.made == FAST.max_recreations
        fleet.actors["r0"].dead = True
        await fleet.supervisor.check_once()
        await fleet.settle()
        assert fleet.made == FAST.max_recreations  # not made anew again
        watch = fleet.supervisor.watches["r0"]
        assert "crash-loop breaker" in watch.gave_up and "r0 died 3 times" in watch.gave_up
        assert fleet.supervisor.replica_states()["r0"] == "broken"
        await fleet.supervisor.check_once()  # a broken replica is not asked again
        assert fleet.routed() == ["r1"] and fleet.serving == [True]

    asyncio.run(main())


def test_a_failed_recreation_counts_and_the_next_check_tries_again():
    async def main() -> None:
        fleet = Fleet()
        fleet.actors["r0"].dead = True
        fleet.fail_recreate = True
        await fleet.supervisor.check_once()
        await fleet.settle()
        assert fleet.made == 0 and len(fleet.supervisor.watches["r0"].recreations) == 1
        fleet.fail_recreate = False
        await fleet.supervisor.check_once()  # still the dead actor: made anew now
        await fleet.settle()
        await fleet.supervisor.check_once()
        assert fleet.made == 1 and fleet.routed() == ["r0", "r1"]

    asyncio.run(main())


def test_health_says_not_serving_while_no_replica_is_healthy_and_serving_again_after():
    async def main() -> None:
        fleet = Fleet()
        for actor in fleet.actors.values():
            actor.health = ReplicaHealth(ReplicaState.WAITING_FOR_RESOURCES, False, "no GPU")
        await fleet.supervisor.check_once()
        assert fleet.serving == [False] and fleet.routed() == []
        fleet.actors["r1"].health = ReplicaHealth(ReplicaState.SERVING, True)
        await fleet.supervisor.check_once()
        assert fleet.serving == [False, True] and fleet.routed() == ["r1"]

    asyncio.run(main())


def test_stop_cancels_a_recreation_waiting_on_its_backoff_and_checks_no_more():
    async def main() -> None:
        fleet = Fleet()
        fleet.supervisor.backoff_s = 30.0
        fleet.actors["r0"].dead = True
        await fleet.supervisor.check_once()
        task = fleet.supervisor.watches["r0"].recreating
        assert task is not None
        await asyncio.wait_for(fleet.supervisor.stop(), 1.0)
        assert task.cancelled() and fleet.made == 0
        await asyncio.wait_for(fleet.supervisor.run(), 1.0)  # returns at once

    asyncio.run(main())


def test_supervision_config_names_a_bad_field():
    with pytest.raises(ValueError, match="interval_s must be > 0, got 0"):
        SupervisionConfig(interval_s=0)
    with pytest.raises(ValueError, match="max_recreations must be >= 0, got -1"):
        SupervisionConfig(max_recreations=-1)


def test_metrics_and_the_status_api_report_each_replicas_state():
    from kvtide.cluster.frontend.metrics import FrontendMetrics
    from kvtide.cluster.frontend.replicas import ReplicaSet
    from kvtide.cluster.frontend.status import cluster_status

    async def main() -> None:
        fleet = Fleet()
        metrics = FrontendMetrics(ReplicaSet({}, fleet.state))
        metrics.replica_health = fleet.supervisor.health
        fleet.actors["r0"].health = ReplicaHealth(ReplicaState.BROKEN, False, "its shards failed 4 times in a row")
        await fleet.supervisor.check_once()
        text = metrics.render().decode()
        assert 'kvtide:replica_up{replica="r0",state="broken"} 0.0' in text
        assert 'kvtide:replica_up{replica="r1",state="serving"} 1.0' in text
        status = cluster_status(fleet.state.router.status(), health=fleet.supervisor.health())
        assert [(h.replica_id, h.state, h.healthy, h.reason) for h in status.health] == [
            ("r0", "broken", False, "its shards failed 4 times in a row"), ("r1", "serving", True, "")]

    asyncio.run(main())
