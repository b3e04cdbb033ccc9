"""What a replica tells the cluster about itself: its registration (hash parameters and request
limits), its load, its KV cache's snapshot and events, published to the state store.

A mixin of ``Replica`` (its methods are actor methods); it needs ``self._engine()`` and
``self.spec``. The replica is the only place an engine's stats become a ``ReplicaLoad``.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from kvtide.cluster.replica.publisher import ReplicaPublisher
from kvtide.proto.block_hash import HASH_VERSION
from kvtide.proto.kv_events import KvEvent
from kvtide.router import ReplicaLoad, ReplicaRegistration
from kvtide.workers import KvSnapshot


class Reporting:
    _incarnation = ""
    _publisher: ReplicaPublisher | None = None

    def registration(self, replica_id: str) -> ReplicaRegistration:
        """What this replica registers under ``replica_id``. The incarnation is fixed per
        process, so a restarted replica under the same id is told apart (its event ids start
        again at 0)."""
        cfg, limits = self._engine().config, self._engine().limits
        shards = self.executor.current()
        if not self._incarnation:
            self._incarnation = uuid.uuid4().hex
        return ReplicaRegistration(
            replica_id=replica_id,
            block_size=cfg.block_size,
            hash_seed=cfg.engine.cache.hash_seed.encode(),
            hash_version=HASH_VERSION,
            num_blocks=cfg.num_blocks,
            model=self.spec.model_name or Path(cfg.model_dir).name,
            incarnation=self._incarnation,
            max_model_len=limits.max_model_len,
            vocab_size=limits.vocab_size,
            max_num_seqs=limits.max_num_seqs,
            tp=self.spec.tp,
            pp=self.spec.pp,
            device=cfg.device.type,
            dtype=str(cfg.dtype).removeprefix("torch."),
            weight_bytes=sum(r.weight_bytes for r in shards.reports),
            kv_cache_bytes=sum(shards.kv_bytes),
        )

    def load(self) -> ReplicaLoad:
        s = self._engine().stats()
        return ReplicaLoad(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_free_blocks=s.num_free_blocks,
            num_total_blocks=self._engine().config.num_blocks,
            kv_cache_usage=s.kv_cache_usage,
            num_preemptions=s.num_preemptions,
            prefix_cache_queried_tokens=s.prefix_cache_queried_tokens,
            prefix_cache_hit_tokens=s.prefix_cache_hit_tokens,
            timestamp_s=time.time(),
            num_restarts=self.executor.num_restarts,
            num_pending_prefill_tokens=s.num_pending_prefill_tokens,
        )

    def kv_snapshot(self) -> KvSnapshot:
        """(last_event_id, cached block hashes) for a router's resync; safe while stepping."""
        return self._engine().kv_snapshot()

    def take_kv_events(self) -> list[KvEvent]:
        """KV events since the last call, for a caller that feeds a router directly (tests,
        ``bench/routing.py``). Not together with ``start_publishing``: each event goes to one
        consumer."""
        return self._engine().drain_kv_events()

    def start_publishing(
        self, url: str, replica_id: str, interval_s: float = 0.1, ttl_s: float = 3.0
    ) -> ReplicaRegistration:
        """Publish KV events, load and a heartbeat to the Redis at ``url`` every ``interval_s``
        (``ReplicaPublisher``); the registry entry expires ``ttl_s`` after the last heartbeat.
        Returns the registration. Idempotent for the same url and id."""
        reg = self.registration(replica_id)
        current = self._publisher
        if current is not None and current.running:
            if (current.url, current.registration) == (url, reg):
                return reg
            current.stop()
        self._publisher = ReplicaPublisher(
            url, reg, self._engine().drain_kv_events, self.load, interval_s=interval_s, ttl_s=ttl_s
        )
        self._publisher.start()
        return reg

    def stop_publishing(self) -> None:
        """Stop publishing and leave the registry (``shutdown`` does it too)."""
        if self._publisher is not None:
            self._publisher.stop()

    def publisher_stats(self) -> dict[str, int | str]:
        p = self._publisher
        if p is None:
            return {}
        return {"published": p.num_published, "failed": p.num_failed, "events_dropped": p.num_events_dropped,
                "last_error": p.last_error}  # fmt: skip

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache (an ``AllBlocksCleared`` event tells the router), for
        benchmarks that compare policies from a cold cache. Only while the replica is idle:
        returns False, changing nothing, while a request is queued or running."""
        if self._engine().has_unfinished_requests():
            return False
        return self._engine().kv.reset_prefix_cache()
