"""Cluster state in Redis: replica registry with heartbeats, load snapshots, KV event streams.

Keys (``{ns}`` is the namespace, ``kvtide`` by default):

- ``{ns}:replicas`` — set of replica ids ever registered (pruned when their key expired);
- ``{ns}:replica:{id}`` — hash: the ``ReplicaRegistration``; expires ``ttl_s`` after the last
  heartbeat, so a dead replica drops out of the registry without anyone deleting it;
- ``{ns}:load:{id}`` — hash: the latest ``ReplicaLoad``, same expiry;
- ``{ns}:events:{id}`` — stream of the replica's KV events, one entry per event, capped
  at about ``stream_maxlen`` entries (a reader that falls further behind sees a gap in the
  event ids and resyncs from a snapshot);
- ``{ns}:status`` — JSON of the router's status, for whoever wants the cluster's view.

Values are plain fields (numbers as decimal text, hashes as raw bytes): nothing is pickled.

Never on the per-token path. Every call has explicit socket timeouts and a few quick retries
(redis-py's defaults differ between versions); when Redis is unreachable the calls raise one
of ``STORE_ERRORS`` and callers carry on with what they knew.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import redis
import redis.asyncio as aioredis

from kvtide.proto.block_hash import BlockHash
from kvtide.proto.kv_events import (
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    KvEvent,
)
from kvtide.router.types import ReplicaLoad, ReplicaRegistration
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

STORE_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
"""What a call raises when Redis is unreachable, slow or restarting."""

_HASH_BYTES = 32


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

    def _key(self, kind: str, replica_id: str = "") -> str:
        return f"{self._ns}:{kind}:{replica_id}" if replica_id else f"{self._ns}:{kind}"

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
        pipe.hset(self._key("replica", rid), mapping=_registration_fields(registration))
        pipe.pexpire(self._key("replica", rid), ttl_ms)
        pipe.sadd(self._key("replicas"), rid)
        if load is not None:
            pipe.hset(self._key("load", rid), mapping=_dataclass_fields(load))
            pipe.pexpire(self._key("load", rid), ttl_ms)
        for event in events:
            pipe.xadd(
                self._key("events", rid), _event_fields(event), maxlen=self.options.stream_maxlen, approximate=True
            )
        await pipe.execute()

    async def unregister(self, replica_id: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(self._key("replica", replica_id), self._key("load", replica_id), self._key("events", replica_id))
        pipe.srem(self._key("replicas"), replica_id)
        await pipe.execute()

    # ---- the frontend's side ------------------------------------------------------------

    async def replicas(self) -> dict[str, ReplicaRegistration]:
        """Live registrations (heartbeat within their TTL); prunes expired ids from the set."""
        ids = sorted(i.decode() for i in await self._redis.smembers(self._key("replicas")))
        if not ids:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for rid in ids:
            pipe.hgetall(self._key("replica", rid))
        found = await pipe.execute()
        live = {rid: _parse_registration(rid, f) for rid, f in zip(ids, found) if f}
        dead = [rid for rid, f in zip(ids, found) if not f]
        if dead:
            await self._redis.srem(self._key("replicas"), *dead)
        return live

    async def loads(self, replica_ids: Iterable[str]) -> dict[str, ReplicaLoad]:
        ids = list(replica_ids)
        if not ids:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for rid in ids:
            pipe.hgetall(self._key("load", rid))
        found = await pipe.execute()
        return {rid: _parse_load(f) for rid, f in zip(ids, found) if f}

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
            out[rid] = EventBatch(entries[-1][0], tuple(_parse_event(f) for _, f in entries))
        return out

    async def put_status(self, status: dict) -> None:
        await self._redis.set(self._key("status"), json.dumps(status, default=str))

    async def status(self) -> dict | None:
        raw = await self._redis.get(self._key("status"))
        return None if raw is None else json.loads(raw)


# ---- encoding ----------------------------------------------------------------------------


def _dataclass_fields(obj) -> dict[str, str]:
    return {f.name: str(getattr(obj, f.name)) for f in fields(obj)}


def _registration_fields(reg: ReplicaRegistration) -> dict[str, str | bytes]:
    out: dict[str, str | bytes] = _dataclass_fields(reg)
    out["hash_seed"] = reg.hash_seed
    return out


def _parse_registration(replica_id: str, f: dict[bytes, bytes]) -> ReplicaRegistration:
    return ReplicaRegistration(
        replica_id=replica_id,
        block_size=int(f[b"block_size"]),
        hash_seed=f[b"hash_seed"],
        hash_version=int(f[b"hash_version"]),
        num_blocks=int(f[b"num_blocks"]),
        model=f[b"model"].decode(),
        incarnation=f[b"incarnation"].decode(),
    )


def _parse_load(f: dict[bytes, bytes]) -> ReplicaLoad:
    return ReplicaLoad(
        num_running=int(f[b"num_running"]),
        num_waiting=int(f[b"num_waiting"]),
        num_free_blocks=int(f[b"num_free_blocks"]),
        num_total_blocks=int(f[b"num_total_blocks"]),
        kv_cache_usage=float(f[b"kv_cache_usage"]),
        num_preemptions=int(f[b"num_preemptions"]),
    )


def _event_fields(event: KvEvent) -> dict[str, str | bytes]:
    match event:
        case BlocksStored(event_id=eid, block_hashes=hashes, parent_hash=parent):
            out: dict[str, str | bytes] = {"kind": "stored", "id": str(eid), "hashes": b"".join(hashes)}
            if parent is not None:
                out["parent"] = parent
            return out
        case BlocksRemoved(event_id=eid, block_hashes=hashes):
            return {"kind": "removed", "id": str(eid), "hashes": b"".join(hashes)}
        case AllBlocksCleared(event_id=eid):
            return {"kind": "cleared", "id": str(eid)}
    raise TypeError(f"not a KV event: {event!r}")


def _split_hashes(raw: bytes) -> tuple[BlockHash, ...]:
    if len(raw) % _HASH_BYTES:
        raise ValueError(f"hashes field is {len(raw)} bytes, not a multiple of {_HASH_BYTES}")
    return tuple(BlockHash(raw[i : i + _HASH_BYTES]) for i in range(0, len(raw), _HASH_BYTES))


def _parse_event(f: dict[bytes, bytes]) -> KvEvent:
    kind, eid = f[b"kind"], int(f[b"id"])
    if kind == b"stored":
        parent = f.get(b"parent")
        return BlocksStored(eid, _split_hashes(f[b"hashes"]), BlockHash(parent) if parent else None)
    if kind == b"removed":
        return BlocksRemoved(eid, _split_hashes(f[b"hashes"]))
    if kind == b"cleared":
        return AllBlocksCleared(eid)
    raise ValueError(f"unknown KV event kind {kind!r} in the event stream")
