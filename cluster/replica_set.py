"""The replicas a frontend sends to, and the routing seam in front of them.

``ReplicaSet`` holds the Ray actor handles by replica id and asks a router which one serves
a request. The router is a ``kvtide.router.Router`` with every replica registered; without
one (tests, a single replica) it falls back to round-robin. It also keeps each
replica's latest ``EngineStats``, refreshed in the background (never on the per-token path),
for metrics and ``ClusterStatus``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NewType

import ray

from kvtide.router import NoReplicaError, ReplicaLoad, Router
from kvtide.workers.engine import EngineStats

logger = logging.getLogger(__name__)

ReplicaId = NewType("ReplicaId", str)


class NoReplicaAvailable(Exception):
    """No replica can take the request (none registered, or all excluded)."""


@dataclass(frozen=True)
class RoutedReplica:
    replica_id: ReplicaId
    actor: Any
    """The ``ReplicaActor`` handle."""


class ReplicaSet:
    def __init__(
        self,
        actors: Mapping[str, Any],
        router: Router | None = None,
        *,
        feed_loads: bool = True,
    ) -> None:
        self.actors = {ReplicaId(k): v for k, v in actors.items()}
        self.router = router
        self._feed_loads = feed_loads
        """Hand each refreshed load to the router (when nothing else, e.g. Redis, feeds it)."""
        self.on_replica_failed: Callable[[str], None] | None = None
        """Told once when a request, or the stats refresh, finds a replica dead, so routing
        stops at once (and its owner can free what it held)."""
        self._next = itertools.cycle(sorted(self.actors))
        self.stats: dict[ReplicaId, EngineStats] = {}
        self._dead: set[ReplicaId] = set()
        """Replicas Ray reported dead: reported once, their stats no longer asked for."""

    def choose(self, prompt_token_ids: Sequence[int], max_tokens: int) -> RoutedReplica:
        """Raises ``NoReplicaAvailable``."""
        if not self.actors:
            raise NoReplicaAvailable("no replica is serving")
        if self.router is None:
            rid = next(self._next)
        else:
            try:
                rid = ReplicaId(self.router.choose(prompt_token_ids, max_tokens).replica_id)
            except NoReplicaError as exc:
                raise NoReplicaAvailable(str(exc)) from exc
        actor = self.actors.get(rid)
        if actor is None:
            raise NoReplicaAvailable(f"the router chose replica {rid!r}, which this frontend does not know")
        return RoutedReplica(rid, actor)

    def on_finished(self, replica_id: str, num_prompt_tokens: int, num_output_tokens: int) -> None:
        if self.router is not None:
            self.router.on_request_finished(replica_id, num_prompt_tokens, num_output_tokens)

    def on_ended(self, replica_id: str) -> None:
        """A routed request ended without finishing (cancelled, timed out, failed)."""
        if self.router is not None:
            self.router.on_request_ended(replica_id)

    def replica_failed(self, replica_id: str) -> None:
        """Ray reported the replica's actor dead; its owner hears it once."""
        if replica_id in self._dead:
            return
        self._dead.add(ReplicaId(replica_id))
        if self.on_replica_failed is not None:
            self.on_replica_failed(replica_id)

    def routing_status(self) -> dict:
        return self.router.status() if self.router is not None else {"policy": "round_robin", "replicas": {}}

    async def refresh_stats(self, timeout_s: float = 5.0) -> None:
        """Fetch every replica's ``EngineStats``; a replica that does not answer keeps its last."""

        async def one(rid: ReplicaId, actor: Any) -> None:
            if rid in self._dead:
                return
            try:
                stats = self.stats[rid] = await asyncio.wait_for(actor.stats.remote(), timeout_s)
            except ray.exceptions.ActorDiedError as exc:
                # Found dead while idle (no request saw it): same as a request finding it.
                logger.warning("replica %s is dead: %s", rid, exc)
                self.replica_failed(rid)
                return
            except Exception as exc:  # noqa: BLE001 - a lost replica must not stop the others' stats
                logger.warning("stats of replica %s unavailable: %s", rid, exc)
                return
            if self.router is not None and self._feed_loads and rid in self.router.replica_ids():
                num_blocks = self.router.registration(rid).num_blocks
                load = ReplicaLoad(
                    stats.num_running, stats.num_waiting, stats.num_free_blocks, num_blocks,
                    stats.kv_cache_usage, stats.num_preemptions,
                )  # fmt: skip
                self.router.update_load(rid, load)

        await asyncio.gather(*(one(rid, a) for rid, a in self.actors.items()))

    async def refresh_forever(self, interval_s: float) -> None:
        while True:
            await self.refresh_stats()
            await asyncio.sleep(interval_s)
