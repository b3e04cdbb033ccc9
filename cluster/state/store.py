"""Cluster state in Redis: replica registry with heartbeats, load snapshots, KV event streams.

Keys (``{ns}`` is the namespace, ``kvtide`` by default):

- ``{ns}:replica:{id}`` — a serialized ``ReplicaRegistration``; expires ``ttl_s`` after the
  last heartbeat, so a dead replica drops out of the registry without anyone deleting it;
- ``{ns}:load:{id}`` — a serialized ``LoadReport``, same expiry;
- ``{ns}:events:{id}`` — stream of the replica's KV events, one entry per event (field
  ``event``: a serialized ``KvEvent``), capped at about ``stream_maxlen`` entries (a reader
  that falls further behind sees a gap in the event ids and resyncs from a snapshot);
- ``{ns}:status`` — a serialized ``ClusterStatusResponse``: a frontend's view of the cluster.

Every value is one of proto/kvtide.proto's messages (``codec`` converts): nothing is pickled.

Never on the per-token path. Every call has explicit socket timeouts and a few quick retries
(redis-py's defaults differ between versions); when Redis is unreachable the calls raise one
of ``STORE_ERRORS`` and callers carry on with what they knew.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis

from kvtide.cluster.state import codec
from kvtide.proto import kvtide_pb2 as pb
from kvtide.proto.kv_events import KvEvent
from kvtide.router import ReplicaLoad, ReplicaRegistration
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

STORE_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
"""What a call raises when Redis is unreachable, slow or restarting."""


@dataclass(frozen=True)
class StoreOptions:
    namespace: str = "kvtide"
    socket_timeout_s: float = 0.5
    connect_timeout_s: float = 0.5
    retries: int = 2
    """Retries after a connection error or timeout, with backoff from 20 ms up to 200 ms."""
    max_connections: int = 16
    pool_timeout_s: float = 1.0
    """How long a call waits for a free pooled connection (a blocking pool: the default pool
    raises instead once ``max_connections`` are out)."""
    stream_maxlen: int = 10_000


@dataclass(frozen=True)
class EventBatch:
    cursor: bytes
    """Stream id of the last entry read: pass it back to read on."""
    events: tuple[KvEvent, ...]


class StateStore:
    def __init__(self, url: str, options: StoreOptions | None = None) -> None:
        self.url = url
        self.public_url = public_url(url)
        self.options = o = options or StoreOptions()
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=o.max_connections,
            timeout=o.pool_timeout_s,
            socket_timeout=o.socket_timeout_s,
            socket_connect_timeout=o.connect_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), o.retries),
            retry_on_timeout=True,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._ns = o.namespace

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    def _key(self, kind: str, replica_id: str | None = None) -> str:
        return f"{self._ns}:{kind}" if replica_id is None else f"{self._ns}:{kind}:{replica_id}"

    # ---- the replica's side: one round trip per tick ------------------------------------

    async def publish(
        self,
        registration: ReplicaRegistration,
        load: ReplicaLoad | None,
        events: Sequence[KvEvent],
        ttl_s: float,
    ) -> None:
        """Heartbeat (registration with a fresh expiry), load snapshot and new events, in one
        pipeline. Not atomic: a reader may see the events before the load, which is fine."""
        rid = registration.replica_id
        ttl_ms = int(ttl_s * 1000)
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self._key("replica", rid), codec.registration_to_proto(registration).SerializeToString(), px=ttl_ms)
        if load is not None:
            pipe.set(self._key("load", rid), codec.load_to_proto(rid, load).SerializeToString(), px=ttl_ms)
        for event in events:
            entry = {"event": codec.event_to_proto(rid, event).SerializeToString()}
            pipe.xadd(self._key("events", rid), entry, maxlen=self.options.stream_maxlen, approximate=True)
        await pipe.execute()

    async def unregister(self, replica_id: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(self._key("replica", replica_id), self._key("load", replica_id), self._key("events", replica_id))
        await pipe.execute()

    # ---- the frontend's side ------------------------------------------------------------

    async def replicas(self) -> dict[str, ReplicaRegistration]:
        """Live registrations (heartbeat within their TTL), by replica id."""
        prefix = self._key("replica", "")
        keys = sorted([k async for k in self._redis.scan_iter(match=f"{prefix}*", count=1000)])
        if not keys:
            return {}
        found = await self._redis.mget(keys)
        regs = [codec.registration_from_proto(_parse(pb.ReplicaRegistration, raw)) for raw in found if raw]
        return {r.replica_id: r for r in regs}

    async def loads(self, replica_ids: Iterable[str]) -> dict[str, ReplicaLoad]:
        ids = list(replica_ids)
        if not ids:
            return {}
        found = await self._redis.mget([self._key("load", rid) for rid in ids])
        return {rid: codec.load_from_proto(_parse(pb.LoadReport, raw)) for rid, raw in zip(ids, found) if raw}

    async def read_events(self, cursors: dict[str, bytes], count: int = 1000) -> dict[str, EventBatch]:
        """New events of each replica after its cursor (``b"0"``: from the start), at most
        ``count`` per replica; replicas with nothing new are left out. Never blocks."""
        if not cursors:
            return {}
        streams = {self._key("events", rid): cursor for rid, cursor in cursors.items()}
        reply = await self._redis.xread(streams, count=count)
        prefix = len(self._key("events", "x")) - 1
        out = {}
        for key, entries in reply:
            rid = key.decode()[prefix:]
            events = tuple(codec.event_from_proto(_parse(pb.KvEvent, f[b"event"])) for _, f in entries)
            out[rid] = EventBatch(entries[-1][0], events)
        return out

    async def put_status(self, status: pb.ClusterStatusResponse) -> None:
        await self._redis.set(self._key("status"), status.SerializeToString())

    async def status(self) -> pb.ClusterStatusResponse | None:
        raw = await self._redis.get(self._key("status"))
        return None if raw is None else _parse(pb.ClusterStatusResponse, raw)


def public_url(url: str) -> str:
    """``url`` with its password hidden, for logs and errors."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"))


def _parse(message_type, raw: bytes):
    msg = message_type()
    msg.ParseFromString(raw)
    return msg
