"""The replica's side of the cluster state: every ``interval_s`` it pushes its new KV events,
its load and a heartbeat to Redis in one round trip.

It runs on its own thread with its own event loop, so a slow or dead Redis never delays the
replica's streams (its event loop) or its engine (the stepping thread). While Redis is down
it drops the events it could not push: the router sees the gap in event ids when Redis
returns and resyncs from the replica's snapshot, which is cheaper and simpler than
buffering an unbounded backlog.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from kvtide.cluster.state.store import STORE_ERRORS, StateStore, StoreOptions, public_url
from kvtide.proto.kv_events import KvEvent
from kvtide.router.types import ReplicaLoad, ReplicaRegistration

logger = logging.getLogger(__name__)


class ReplicaPublisher:
    def __init__(
        self,
        url: str,
        registration: ReplicaRegistration,
        take_events: Callable[[], list[KvEvent]],
        load: Callable[[], ReplicaLoad],
        *,
        interval_s: float = 0.1,
        ttl_s: float = 3.0,
        options: StoreOptions | None = None,
    ) -> None:
        if not 0 < interval_s < ttl_s:
            raise ValueError(f"need 0 < interval_s < ttl_s, got interval_s={interval_s} and ttl_s={ttl_s}")
        self.url = url
        self.registration = registration
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._take_events = take_events
        self._load = load
        self._options = options
        self._stop = threading.Event()
        self._unregister = True
        self._thread = threading.Thread(target=self._main, name="kvtide-publisher", daemon=True)
        self.num_published = 0
        """Ticks that reached Redis."""
        self.num_failed = 0
        """Ticks that did not."""
        self.num_events_dropped = 0
        self.last_error = ""
        """Why the last tick that failed did (start-up reports it when nothing reached Redis)."""

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0, unregister: bool = True) -> None:
        """Stop publishing and (unless told not to) remove the replica from the registry, best
        effort, so the router stops routing to it now rather than when its heartbeat expires."""
        self._unregister = unregister
        self._stop.set()
        self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        store = StateStore(self.url, self._options)
        was_down = False
        try:
            while not self._stop.is_set():
                events = self._take_events()
                try:
                    await store.publish(self.registration, self._load(), events, self.ttl_s)
                    self.num_published += 1
                    if was_down:
                        logger.info("state store %s is back; publishing again", public_url(self.url))
                        was_down = False
                except STORE_ERRORS as exc:
                    self.num_failed += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    self.num_events_dropped += len(events)
                    if not was_down:
                        logger.warning("state store %s unreachable (%s); dropping KV events until it returns",
                                       public_url(self.url), exc)  # fmt: skip
                        was_down = True
                await asyncio.sleep(self.interval_s)
            if self._unregister:
                try:
                    await store.unregister(self.registration.replica_id)
                except STORE_ERRORS:
                    logger.warning("could not leave the registry at %s; the entry expires in %.1f s",
                                   public_url(self.url), self.ttl_s)  # fmt: skip
        finally:
            await store.close()
