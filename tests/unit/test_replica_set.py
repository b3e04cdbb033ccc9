"""``ReplicaSet`` without Ray actors: fakes whose ``stats.remote()`` answers or raises."""

from __future__ import annotations

import asyncio

import ray

from kvtide.cluster.replica_set import ReplicaSet


class _Method:
    def __init__(self, fn) -> None:
        self.remote, self.calls = self._remote, 0
        self._fn = fn

    def _remote(self):
        self.calls += 1
        return self._fn()


class _FakeActor:
    def __init__(self, error: BaseException) -> None:
        async def answer():
            raise error

        self.stats = _Method(answer)


def test_a_replica_found_dead_while_idle_is_reported_once_and_not_asked_again():
    """No request saw it die; the stats refresh does, and tells the owner (who frees its
    placement) once. A replica that is only slow keeps being asked."""
    dead = _FakeActor(error=ray.exceptions.ActorDiedError())
    slow = _FakeActor(error=TimeoutError("slow"))
    replicas = ReplicaSet({"replica-0": dead, "replica-1": slow})
    failed: list[str] = []
    replicas.on_replica_failed = failed.append

    async def refresh_three_times() -> None:
        for _ in range(3):
            await replicas.refresh_stats(timeout_s=1.0)

    asyncio.run(refresh_three_times())
    assert failed == ["replica-0"]
    assert (dead.stats.calls, slow.stats.calls) == (1, 3)

