"""The frontend's one owner of what it knows about replicas: it keeps a ``Router`` fed (which
replicas are live, their loads, their prefix caches) and decides when a replica is gone.

From Redis (a ``StateStore``): every ``poll_interval_s`` it reads the registry (new replicas
are registered, replicas whose heartbeat expired are dropped), the loads and each replica's
new KV events, and hands them to the router. A replica is resynced from its own snapshot
(``ReplicaHandle.kv_snapshot``) when it first appears, when its events show a gap, and after
every Redis outage (the publishers dropped events meanwhile).

Without Redis: the replicas are registered up front (``register``), their loads are polled
from the handles every ``load_interval_s`` (the same ``ReplicaLoad`` the replica would
publish), and routing is approximate (the router's own decisions).

Liveness: a replica a request or the load poll finds dead, or whose heartbeat expires,
leaves the router at once (``on_replica_lost`` hears it once); one the supervisor finds unfit
(``set_healthy``) leaves it until it is healthy again. While Redis is unreachable the router
routes on the last state it knew, approximately, until each replica's resync; only a registry
that answers and lacks a replica for ``missing_grace_s`` removes it.

Runs on the frontend's event loop, the same one that calls ``Router.choose``: no lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from kvtide.cluster.frontend.handles import ReplicaGone, ReplicaHandle
from kvtide.cluster.frontend.status import StoreStatus, cluster_status
from kvtide.cluster.state.store import STORE_ERRORS, StateStore
from kvtide.proto import kvtide_pb2 as pb
from kvtide.router import ReplicaRegistration, Router

logger = logging.getLogger(__name__)


class ClusterState:
    def __init__(
        self,
        router: Router,
        handles: Mapping[str, ReplicaHandle],
        store: StateStore | None,
        *,
        poll_interval_s: float = 0.1,
        load_interval_s: float = 1.0,
        snapshot_timeout_s: float = 5.0,
        resync_retry_s: float = 1.0,
        missing_grace_s: float = 1.0,
        status_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self.handles = handles
        self.store = store
        self.on_replica_lost: Callable[[str], None] | None = None
        """Told once when a replica leaves for good (dead, or its heartbeat expired)."""
        self.lost: set[str] = set()
        """Replicas that left (until one registers again under the same id)."""
        self.unhealthy: set[str] = set()
        """Replicas the supervisor found unfit to serve: out of routing until healthy again."""
        self._registrations: dict[str, ReplicaRegistration] = {}
        """The last registration of each replica (to route to it again once healthy)."""
        self.poll_interval_s = poll_interval_s
        self.load_interval_s = load_interval_s
        self._loads_polled_at = float("-inf")
        self.snapshot_timeout_s = snapshot_timeout_s
        self.resync_retry_s = resync_retry_s
        self.missing_grace_s = missing_grace_s
        self.status_interval_s = status_interval_s
        self._clock = clock
        self._cursors: dict[str, bytes] = {}
        self._needs_resync: dict[str, float] = {}
        """replica id -> earliest time of the next try."""
        self._last_seen: dict[str, float] = {}
        self._failed: set[tuple[str, str]] = set()
        """(replica id, incarnation) reported dead: not re-registered from a stale entry."""
        self._rejected: set[ReplicaRegistration] = set()
        """Registrations the router refused (hash parameters differ)."""
        self._store_up: bool | None = None
        self._last_status_at = float("-inf")
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.num_resyncs = 0
        self.num_outages = 0

    @property
    def store_up(self) -> bool:
        """False while the last poll could not reach Redis (or none has run)."""
        return bool(self._store_up)

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kvtide-cluster-state")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the background task (idempotent); waits at most ``timeout_s``."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            logger.warning("cluster state task did not stop within %.1f s", timeout_s)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one poll must not stop the feeding
                logger.exception("cluster state poll failed")
            # NOTE: redis-py may turn a cancellation during a command into a ConnectionError,
            # which poll_once takes for an outage; the task's own count says we were cancelled.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            await asyncio.sleep(self.poll_interval_s)

    # ---- the frontend's notices --------------------------------------------------------

    def register(self, registration: ReplicaRegistration) -> None:
        """A replica known without Redis (direct registration); raises ``ValueError`` if its
        hash parameters differ from the router's."""
        self._registrations[registration.replica_id] = registration
        self.lost.discard(registration.replica_id)
        if registration.replica_id not in self.unhealthy:
            self.router.register(registration)

    def set_healthy(self, replica_id: str, healthy: bool) -> None:
        """The supervisor's verdict: an unhealthy replica leaves routing now; a healthy one comes
        back (from Redis at the next poll, or from its last direct registration)."""
        if not healthy:
            if replica_id not in self.unhealthy:
                self.unhealthy.add(replica_id)
                if replica_id in self.router.replica_ids():
                    self.router.unregister(replica_id)
            return
        if replica_id in self.unhealthy:
            self.unhealthy.discard(replica_id)
            reg = self._registrations.get(replica_id)
            if self.store is None and reg is not None and replica_id not in self.router.replica_ids():
                self.router.register(reg)

    def replica_failed(self, replica_id: str) -> None:
        """The replica is dead (a request or a load poll found it so): stop routing to it now,
        not when its heartbeat expires. A restart under the same id (a new incarnation) is
        registered again."""
        try:
            incarnation = self.router.registration(replica_id).incarnation
        except KeyError:
            return
        self._failed.add((replica_id, incarnation))
        self._forget(replica_id)
        self._lost(replica_id)

    def _lost(self, replica_id: str) -> None:
        self.lost.add(replica_id)
        if self.on_replica_lost is not None:
            self.on_replica_lost(replica_id)

    # ---- one poll ----------------------------------------------------------------------

    async def poll_once(self) -> bool:
        """One round: registry, loads, events, due resyncs. False when Redis was unreachable."""
        if self.store is None:
            await self._poll_loads()
            await self._resync_due()
            return False
        now = self._clock()
        try:
            registry = await self.store.replicas()
            if self._store_up is False:
                # NOTE: a Redis back from an outage may have lost every registration: a replica
                # missing from it gets its grace from now, time to publish again.
                for rid in self.router.replica_ids():
                    self._last_seen[rid] = now
            self._sync_registry(registry, now)
            ids = self.router.replica_ids()
            loads = await self.store.loads(ids)
            batches = await self.store.read_events({rid: self._cursors[rid] for rid in ids})
        except STORE_ERRORS as exc:
            self._on_store_down(exc)
            await self._resync_due()
            return False
        if self._store_up is False:
            logger.info("state store %s is back; resyncing every replica", self.store.public_url)
            self._needs_resync.update(dict.fromkeys(self.router.replica_ids(), now))
        self._store_up = True
        routed = set(self.router.replica_ids())  # the supervisor may have taken one out meanwhile
        for rid in (r for r in ids if r in routed):
            if rid in loads:
                self.router.update_load(rid, loads[rid])
            batch = batches.get(rid)
            if batch is not None:
                self._cursors[rid] = batch.cursor
            if not self.router.apply_events(rid, batch.events if batch else ()):
                self._needs_resync.setdefault(rid, now)
        await self._resync_due()
        if now - self._last_status_at >= self.status_interval_s:
            self._last_status_at = now
            try:
                await self.store.put_status(self.status())
            except STORE_ERRORS as exc:
                self._on_store_down(exc)
        return True

    def store_status(self) -> StoreStatus:
        return StoreStatus(self.store.public_url if self.store else None, self.store_up, self.num_outages, self.num_resyncs)

    def status(self) -> pb.ClusterStatusResponse:
        """The cluster's view as this frontend's router has it."""
        return cluster_status(self.router.status(), self.store_status())

    async def _poll_loads(self) -> None:
        """Without Redis: each registered replica's load, straight from its handle."""
        now = self._clock()
        if now - self._loads_polled_at < self.load_interval_s:
            return
        self._loads_polled_at = now
        ids = self.router.replica_ids()
        loads = (asyncio.wait_for(self.handles[rid].load(), self.snapshot_timeout_s) for rid in ids)
        results = await asyncio.gather(*loads, return_exceptions=True)
        for rid, result in zip(ids, results, strict=True):
            if rid not in self.router.replica_ids():
                continue
            if isinstance(result, ReplicaGone):
                logger.warning("replica %s is dead: %s", rid, result)
                self.replica_failed(rid)
            elif isinstance(result, BaseException):
                logger.warning("load of replica %s unavailable: %r", rid, result)
            else:
                self.router.update_load(rid, result)

    # ---- internals ---------------------------------------------------------------------

    def _sync_registry(self, registry: dict, now: float) -> None:
        for rid, reg in registry.items():
            if (rid, reg.incarnation) in self._failed or reg in self._rejected or rid in self.unhealthy:
                continue
            self._last_seen[rid] = now
            known = rid in self.router.replica_ids()
            if known and self.router.registration(rid) == reg:
                continue
            try:
                self.router.register(reg)
            except ValueError as exc:
                logger.error("not routing to replica %s: %s", rid, exc)
                self._rejected.add(reg)  # once: the registry repeats it every heartbeat
                continue
            logger.info("replica %s %s (%d KV blocks)", rid, "re-registered" if known else "registered", reg.num_blocks)
            self.lost.discard(rid)
            self._cursors.setdefault(rid, b"0")
            self._needs_resync[rid] = now
        for rid in self.router.replica_ids():
            if rid not in registry and now - self._last_seen.get(rid, now) > self.missing_grace_s:
                logger.warning("replica %s left the registry (heartbeat expired); no longer routing to it", rid)
                self._forget(rid)
                self._lost(rid)

    def _forget(self, replica_id: str) -> None:
        self.router.unregister(replica_id)
        self._cursors.pop(replica_id, None)
        self._needs_resync.pop(replica_id, None)
        self._last_seen.pop(replica_id, None)

    def _on_store_down(self, exc: BaseException) -> None:
        if self._store_up is not False:
            self.num_outages += 1
            logger.warning("state store %s unreachable (%s); routing on last-known state, approximate mode",
                           self.store.public_url if self.store else None, exc)
            for rid in self.router.replica_ids():
                self.router.mark_unsynced(rid)
        self._store_up = False

    async def _resync_due(self) -> None:
        now = self._clock()
        due = [rid for rid, at in self._needs_resync.items() if at <= now and rid in self.router.replica_ids()]
        if not due:
            return
        snapshots = (asyncio.wait_for(self.handles[rid].kv_snapshot(), self.snapshot_timeout_s) for rid in due)
        results = await asyncio.gather(*snapshots, return_exceptions=True)
        for rid, result in zip(due, results):
            if rid not in self.router.replica_ids():
                continue  # dropped while the snapshot was on its way
            if isinstance(result, BaseException):
                logger.warning("snapshot of replica %s failed (%r); retrying in %.1f s", rid, result, self.resync_retry_s)
                self._needs_resync[rid] = self._clock() + self.resync_retry_s
                continue
            last_event_id, hashes = result
            self.router.resync(rid, last_event_id, hashes)
            self._needs_resync.pop(rid, None)
            self.num_resyncs += 1
