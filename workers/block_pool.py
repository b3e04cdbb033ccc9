"""The physical KV blocks of one replica: ref counts, an LRU free queue, the prefix cache.

A block is *in use* while its ref count is positive (one reference per request whose block
table holds it). A block with ref count 0 sits in the free queue; if it is cached it keeps
its hash there, so a later request can still hit it until ``allocate`` reuses (evicts) it.

NOTE: invariants, checked by the property tests:
- a block is in the free queue iff its ref count is 0;
- ``cached_hash(b) == h`` iff ``get_cached_block(h) == b``: the hash map and the per-block
  hashes are two views of one bijection;
- every change to that map is reported by exactly one ``KvEvent``, in order, with
  ``event_id`` 0, 1, 2, ... per pool; it stays pending until drained or dropped (below).

The pending events are bounded: past ``max_pending_hashes`` hashes (one turnover of the
cache, every block stored and evicted once: ``2 * num_blocks`` by default) the oldest are
dropped, never the newest, and the ids keep counting, so every drop shows as a gap at the
next drain. Nothing has to drain the pool (the offline ``LLM``, a replica that publishes
nowhere); one that drains late sees the gap and resyncs from ``snapshot()``, as the router
does after any lost event. A cap was chosen over recording only while a consumer is attached:
it needs no attach protocol between threads, it also bounds a consumer that stops draining,
and past it a snapshot (at most ``num_blocks`` hashes) is the cheaper way to catch up anyway.

Mutating calls: ``allocate``, ``touch``, ``free``, ``cache_full_blocks``,
``reset_prefix_cache``. Everything else only reads, except ``take_events`` and
``drain_events``, which any thread may call. Otherwise not thread-safe: one engine step loop
owns the pool.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

from kvtide.proto.block_hash import BlockHash
from kvtide.proto.kv_events import AllBlocksCleared, BlocksRemoved, BlocksStored, KvEvent


class KvSnapshot(NamedTuple):
    """The prefix cache's hashes for a router's resync, as of event ``last_event_id`` or later.

    Replaying the events after ``last_event_id`` on top of it gives the current cache, since
    applying a store/remove/clear to a set is idempotent (see ``kvtide.router.prefix_index``).
    """

    last_event_id: int
    """-1 when no event has been emitted yet."""
    block_hashes: tuple[BlockHash, ...]


class BlockPool:
    """``num_blocks`` KV blocks with ids ``0..num_blocks-1``, all free at the start.

    ``max_pending_hashes`` bounds the undrained events, counting each event's hashes (an
    ``AllBlocksCleared`` counts one); None means ``2 * num_blocks``.
    """

    def __init__(self, num_blocks: int, enable_caching: bool, max_pending_hashes: int | None = None) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if max_pending_hashes is not None and max_pending_hashes <= 0:
            raise ValueError(f"max_pending_hashes must be positive, got {max_pending_hashes}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[BlockHash | None] = [None] * num_blocks
        self._hash_to_block: dict[BlockHash, int] = {}
        # Front = next to be allocated (least recently freed); values unused.
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.max_pending_hashes = max_pending_hashes or 2 * num_blocks
        self._events: deque[KvEvent] = deque()
        self._num_pending_hashes = 0
        self._num_events_dropped = 0
        self._events_lock = threading.Lock()
        """Guards the three fields above: the stepping thread emits, a publisher drains."""
        self._next_event_id = 0

    # ---- reads -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0, cached or not: all of them can be allocated."""
        return len(self._free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (ref count > 0), in [0, 1]."""
        return 1.0 - len(self._free_queue) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def cached_hash(self, block_id: int) -> BlockHash | None:
        """The hash under which the block is cached, or None."""
        return self._block_hashes[block_id]

    def get_cached_block(self, block_hash: BlockHash) -> int | None:
        """The block cached under ``block_hash`` (in use or free), or None. Does not touch it."""
        return self._hash_to_block.get(block_hash)

    @property
    def num_pending_hashes(self) -> int:
        """Hashes in the events not yet drained: at most ``max_pending_hashes``, or the newest
        event's alone when it has more."""
        return self._num_pending_hashes

    @property
    def num_events_dropped(self) -> int:
        """Events dropped undrained since the pool was made (each left a gap in the ids)."""
        return self._num_events_dropped

    @property
    def cached_blocks(self) -> Mapping[BlockHash, int]:
        """Read-only live view of the prefix cache: hash -> block id."""
        return MappingProxyType(self._hash_to_block)

    # ---- mutations ---------------------------------------------------------------------

    def allocate(self, num: int) -> list[int]:
        """Take ``num`` blocks from the front of the free queue, each with ref count 1.

        A taken block that is still cached is evicted first: its hash leaves the map and
        one ``BlocksRemoved`` event lists every hash this call evicted, in eviction order.
        Raises ValueError (changing nothing) when fewer than ``num`` blocks are free.
        """
        if num < 0:
            raise ValueError(f"num must be non-negative, got {num}")
        if num > len(self._free_queue):
            raise ValueError(
                f"cannot allocate {num} KV blocks: only {len(self._free_queue)} of "
                f"{self.num_blocks} are free"
            )
        block_ids: list[int] = []
        evicted: list[BlockHash] = []
        for _ in range(num):
            block_id, _ = self._free_queue.popitem(last=False)
            assert self._ref_counts[block_id] == 0, (block_id, self._ref_counts[block_id])
            block_hash = self._block_hashes[block_id]
            if block_hash is not None:
                del self._hash_to_block[block_hash]
                self._block_hashes[block_id] = None
                evicted.append(block_hash)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        if evicted:
            self._emit(BlocksRemoved(self._next_event_id, tuple(evicted)))
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each block; a free (cached) block leaves the free queue."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free_queue[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block, in order.

        A block whose count reaches 0 goes to the back of the free queue (it will be evicted
        last), keeping its hash. Pass a request's blocks tail first so its tail is evicted
        before the prefix others are likelier to share.
        """
        for block_id in block_ids:
            assert self._ref_counts[block_id] > 0, f"double free of block {block_id}"
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free_queue[block_id] = None

    def cache_full_blocks(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[BlockHash],
        parent_hash: BlockHash | None,
    ) -> None:
        """Register full blocks under their chained hashes so later requests can hit them.

        ``block_hashes[i]`` is the hash of ``block_ids[i]``; ``parent_hash`` is the hash of
        the block before ``block_ids[0]`` (None at the start of a chain). A block that is
        already cached is skipped. A hash that already maps to *another* block is a
        duplicate (two requests computed the same prefix without sharing): the existing
        mapping is kept and the duplicate block stays uncached, so it is reused like any
        uncached block once freed.

        Emits one ``BlocksStored`` per contiguous run of newly registered hashes, each with
        the true parent of its first hash — one event in the usual case; a run breaks only
        where a hash in the middle was skipped, and a single event there would tell the
        router a wrong parent. Does nothing when caching is off.
        """
        assert len(block_ids) == len(block_hashes), (len(block_ids), len(block_hashes))
        if not self.enable_caching:
            return
        run: list[BlockHash] = []
        run_parent = parent_hash
        prev = parent_hash
        for block_id, block_hash in zip(block_ids, block_hashes):
            assert self._ref_counts[block_id] > 0, f"caching free block {block_id}"
            cached = self._block_hashes[block_id]
            if cached is None and block_hash not in self._hash_to_block:
                self._hash_to_block[block_hash] = block_id
                self._block_hashes[block_id] = block_hash
                if not run:
                    run_parent = prev
                run.append(block_hash)
            else:
                assert cached is None or cached == block_hash, (block_id, cached, block_hash)
                if run:
                    self._emit(BlocksStored(self._next_event_id, tuple(run), run_parent))
                    run = []
            prev = block_hash
        if run:
            self._emit(BlocksStored(self._next_event_id, tuple(run), run_parent))

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash and emit ``AllBlocksCleared``; only when no block is in use.

        Returns False, changing nothing, while any block is in use (running requests would
        otherwise hold blocks the router believes gone, and later re-register them).
        """
        if len(self._free_queue) != self.num_blocks:
            return False
        self._hash_to_block.clear()
        self._block_hashes = [None] * self.num_blocks
        self._emit(AllBlocksCleared(self._next_event_id))
        return True

    # ---- reads and takes from another thread ------------------------------------------

    def snapshot(self) -> KvSnapshot:
        """The cached hashes, safe to call while another thread mutates the pool.

        NOTE: reads the event counter *before* copying the map, so the copy is at least as
        new as ``last_event_id`` (the counter moves after the map changes). ``tuple(dict)``
        runs in C without releasing the GIL, so the map cannot change during the copy.
        """
        last_event_id = self._next_event_id - 1
        return KvSnapshot(last_event_id, tuple(self._hash_to_block))

    def drain_events(self) -> list[KvEvent]:
        """The pending events, oldest first; the pool forgets them. Safe while the stepping
        thread emits: an event emitted meanwhile is either returned or left for the next call.
        The first one's id is past the previous call's last when events were dropped between
        the two calls."""
        with self._events_lock:
            events = list(self._events)
            self._events.clear()
            self._num_pending_hashes = 0
        return events

    take_events = drain_events

    def _emit(self, event: KvEvent) -> None:
        assert event.event_id == self._next_event_id
        with self._events_lock:
            self._events.append(event)
            self._num_pending_hashes += _num_hashes(event)
            while self._num_pending_hashes > self.max_pending_hashes and len(self._events) > 1:
                self._num_pending_hashes -= _num_hashes(self._events.popleft())
                self._num_events_dropped += 1
        self._next_event_id += 1


def _num_hashes(event: KvEvent) -> int:
    return 1 if isinstance(event, AllBlocksCleared) else len(event.block_hashes)
