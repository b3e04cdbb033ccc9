"""The frontend's watch over its replicas.

Every ``interval_s`` it asks each replica for its health (``Replica.check_health``, bounded by
``check_timeout_s``). A replica that is not fit to take requests (restarting its shards, waiting
for resources, broken, engine thread dead, a hung step, a shard not answering, or no answer at
all) leaves routing at once and comes back when it is healthy again. A replica whose actor died
is made anew under the same id, after an exponential backoff, until a crash-loop breaker gives
up after ``max_recreations`` within ``window_s``; one whose engine thread died is killed first.
A replica that broke its own shards' crash-loop breaker is left broken. Health (gRPC and
``/health``) says NOT_SERVING while no replica is healthy. Each recreation runs on its own task:
one replica's trouble never holds up another's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from kvtide.cluster.frontend.cluster_state import ClusterState
from kvtide.cluster.state.health import ReplicaHealth, ReplicaState, SupervisionConfig

logger = logging.getLogger(__name__)


@dataclass
class _Watch:
    health: ReplicaHealth | None = None
    recreations: deque[float] = field(default_factory=deque)
    recreating: asyncio.Task | None = None
    gave_up: str = ""
    """Why it is no longer recreated (the crash-loop breaker)."""


class Supervisor:
    def __init__(
        self,
        state: ClusterState,
        actors: dict[str, Any],
        recreate: Callable[[str], Awaitable[Any]],
        on_serving: Callable[[bool], Awaitable[None]],
        config: SupervisionConfig | None = None,
    ) -> None:
        """``actors``: replica id -> actor, updated in place when one is made anew;
        ``recreate(rid)`` makes, starts and registers a replica's new actor and returns it;
        ``on_serving(bool)`` sets the servers' health."""
        self.state, self.actors, self._recreate, self._on_serving = state, actors, recreate, on_serving
        self.config = config = config or SupervisionConfig()
        self.interval_s, self.check_timeout_s = config.interval_s, config.check_timeout_s
        self.backoff_s, self.max_backoff_s = config.backoff_s, config.max_backoff_s
        self.max_recreations, self.window_s = config.max_recreations, config.window_s
        self.watches = {rid: _Watch() for rid in actors}
        self._serving: bool | None = None
        self.num_recreations = 0
        self._stopped = False

    def health(self) -> dict[str, ReplicaHealth]:
        """replica id -> its last health, as the status API and the metrics report it."""
        out = {}
        for rid, w in self.watches.items():
            if w.gave_up:
                out[rid] = ReplicaHealth(ReplicaState.BROKEN, False, w.gave_up)
            elif w.recreating is not None:
                out[rid] = ReplicaHealth(ReplicaState.DEAD, False, "its actor died; it is being made anew")
            else:
                out[rid] = w.health or ReplicaHealth(ReplicaState.STARTING, False, "not checked yet")
        return out

    def replica_states(self) -> dict[str, str]:
        """replica id -> its state ("serving", "restarting", ..., "dead", "broken")."""
        return {rid: h.state.value for rid, h in self.health().items()}

    async def run(self) -> None:
        while not self._stopped:
            await self.check_once()
            await asyncio.sleep(self.interval_s)

    async def check_once(self) -> None:
        await asyncio.gather(*(self._check(rid) for rid in list(self.watches)))
        serving = any(w.health is not None and w.health.healthy for w in self.watches.values())
        if serving != self._serving:
            self._serving = serving
            if not serving:
                logger.warning("no replica is healthy: health says NOT_SERVING")
            await self._on_serving(serving)

    def watch(self, rid: str) -> None:
        """Supervise a replica added while serving (the fleet's; ``actors[rid]`` is set)."""
        self.watches.setdefault(rid, _Watch())

    def unwatch(self, rid: str) -> None:
        """Stop supervising a replica the fleet drains and stops: it is neither routed to
        again by a check's verdict nor made anew when its actor is gone."""
        self.watches.pop(rid, None)

    async def _check(self, rid: str) -> None:
        w = self.watches.get(rid)
        if w is None or w.recreating is not None or w.gave_up or self._stopped:
            return
        try:
            health = await asyncio.wait_for(self.actors[rid].check_health.remote(), self.check_timeout_s)
        except ray.exceptions.ActorDiedError as exc:
            if self.watches.get(rid) is not w:
                return  # the fleet stopped it
            self.state.replica_failed(rid)  # first: its owner hears it is lost (and frees its placement)
            self._set(rid, w, ReplicaHealth(ReplicaState.STARTING, False, f"its actor died: {exc}"))
            w.recreating = asyncio.create_task(self._make_anew(rid, w))
            return
        except Exception as exc:  # noqa: BLE001 - no answer in time, or unreachable: not fit now
            health = ReplicaHealth(ReplicaState.SERVING, False, f"no health answer within {self.check_timeout_s:g} s: {exc!r}")
        if self.watches.get(rid) is not w:
            return  # unwatched while the check ran: the fleet owns it now
        self._set(rid, w, health)
        if not health.healthy and "engine thread died" in health.reason:
            ray.kill(self.actors[rid], no_restart=True)  # the next check finds it dead and makes it anew

    def _set(self, rid: str, w: _Watch, health: ReplicaHealth) -> None:
        before = w.health
        w.health = health
        if before is None or before.healthy != health.healthy or before.state != health.state:
            if health.healthy:
                logger.info("replica %s is healthy", rid)
            else:
                logger.warning("replica %s is not fit to serve (%s): %s", rid, health.state.value, health.reason)
        self.state.set_healthy(rid, health.healthy)

    async def _make_anew(self, rid: str, w: _Watch) -> None:
        try:
            now = time.monotonic()
            while w.recreations and now - w.recreations[0] > self.window_s:
                w.recreations.popleft()
            if len(w.recreations) >= self.max_recreations:
                w.gave_up = (f"replica {rid} died {len(w.recreations) + 1} times within {self.window_s:g} s; "
                             "it is not made anew again (crash-loop breaker)")  # fmt: skip
                logger.error(w.gave_up)
                return
            delay_s = min(self.max_backoff_s, self.backoff_s * 2 ** len(w.recreations))
            w.recreations.append(now)
            logger.warning("replica %s died; making it anew in %.0f s", rid, delay_s)
            await asyncio.sleep(delay_s)
            self.actors[rid] = await self._recreate(rid)
            self.num_recreations += 1
            logger.info("replica %s is back", rid)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the next check tries again (and counts it)
            logger.warning("replica %s could not be made anew: %s", rid, exc)
            with contextlib.suppress(Exception):
                ray.kill(self.actors[rid], no_restart=True)
        finally:
            w.recreating = None

    async def stop(self) -> None:
        """No more checks or recreations (the server is stopping); cancels those under way."""
        self._stopped = True
        tasks = [w.recreating for w in self.watches.values() if w.recreating is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
