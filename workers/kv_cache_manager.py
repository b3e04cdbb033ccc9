"""Per-request KV block bookkeeping on top of ``BlockPool``: prefix hits, slots, copy-on-write.

NOTE: the manager keeps one reference in the pool per entry of each request's
``block_ids``; ``request.block_ids[i]`` holds the KV of tokens
``[i * block_size, (i + 1) * block_size)``. ``request.num_computed_tokens`` is advanced by
the scheduler, not here (except when adopting prefix-cache hits in ``allocate_slots``).
"""

from __future__ import annotations

from typing import NamedTuple

from kvtide.proto.block_hash import hash_full_blocks
from kvtide.proto.kv_events import KvEvent
from kvtide.workers.block_pool import BlockPool
from kvtide.workers.request import Request


class ComputedBlocks(NamedTuple):
    """Leading blocks of a request found in the prefix cache."""

    block_ids: list[int]
    num_computed_tokens: int


class KVCacheManager:
    """Allocates, shares and frees the KV blocks of requests."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        hash_seed: bytes = b"",
        extra_key: bytes = b"",
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_seed = hash_seed
        self.extra_key = extra_key
        self.pool = BlockPool(num_blocks, enable_prefix_caching)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def take_events(self) -> list[KvEvent]:
        return self.pool.take_events()

    def reset_prefix_cache(self) -> bool:
        """See ``BlockPool.reset_prefix_cache``; False while any request holds blocks."""
        return self.pool.reset_prefix_cache()

    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """Longest run of leading full blocks of the request that hit the prefix cache.

        Never covers all tokens: the last token must be computed for its logits, so at most
        ``(num_tokens - 1) // block_size`` blocks. Does not change ref counts (pass the result
        to ``allocate_slots``, which touches the blocks); only extends
        ``request.block_hashes``. Returns ``([], 0)`` when caching is off.
        """
        if not self.enable_prefix_caching:
            return ComputedBlocks([], 0)
        self._update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        block_ids: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.get_cached_block(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return ComputedBlocks(block_ids, len(block_ids) * self.block_size)

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed: ComputedBlocks | None = None,
    ) -> list[tuple[int, int]] | None:
        """Make room for the request's computed tokens plus ``num_new_tokens``.

        ``computed`` (first schedule of a waiting request, from ``get_computed_blocks`` in
        the same step) is adopted: its blocks are touched and start the block table, and
        ``request.num_computed_tokens`` / ``num_cached_prompt_tokens`` are set from it.

        Copy-on-write: when the new tokens go into a partially filled block that another
        request shares (only after ``fork``), the request gets a fresh block instead and the
        pair ``(src_block, dst_block)`` is returned for the model runner to copy the KV.

        Every block that is full once the new tokens are computed is registered in the
        prefix cache (their token ids are known at schedule time).

        Returns the copy pairs (usually ``[]``), or None with nothing changed when the pool
        has too few free blocks.
        """
        if computed is None:
            computed = ComputedBlocks([], 0)
        else:
            assert not request.block_ids and request.num_computed_tokens == 0, (
                f"request {request.request_id} adopts cached blocks but already has KV"
            )
            assert computed.num_computed_tokens == len(computed.block_ids) * self.block_size
            assert all(
                self.pool.cached_hash(b) == h
                for b, h in zip(computed.block_ids, request.block_hashes)
            ), "stale ComputedBlocks: call get_computed_blocks in the same step"
        num_computed = request.num_computed_tokens + computed.num_computed_tokens
        num_total = num_computed + num_new_tokens
        num_existing = len(request.block_ids) + len(computed.block_ids)
        num_new_blocks = max(0, self.num_blocks_needed(num_total) - num_existing)

        # A partial block is never cached (only full ones are), so a shared one comes from fork.
        cow_index = num_computed // self.block_size
        needs_cow = (
            num_new_tokens > 0
            and num_computed % self.block_size != 0
            and self.pool.ref_count(request.block_ids[cow_index]) > 1
        )
        # Touching a cached free block takes it out of the free count.
        num_revived = sum(1 for b in computed.block_ids if self.pool.ref_count(b) == 0)
        if num_new_blocks + needs_cow > self.pool.num_free_blocks - num_revived:
            return None

        if computed.block_ids:
            self.pool.touch(computed.block_ids)
            request.block_ids[:0] = computed.block_ids
            request.num_computed_tokens = computed.num_computed_tokens
            request.num_cached_prompt_tokens = min(
                computed.num_computed_tokens, request.num_prompt_tokens
            )
        copies: list[tuple[int, int]] = []
        if needs_cow:
            src = request.block_ids[cow_index]
            (dst,) = self.pool.allocate(1)
            request.block_ids[cow_index] = dst
            self.pool.free([src])
            copies.append((src, dst))
        request.block_ids.extend(self.pool.allocate(num_new_blocks))

        if self.enable_prefix_caching:
            self._update_block_hashes(request)
            first = num_computed // self.block_size
            end = min(num_total, request.num_tokens) // self.block_size
            if end > first:
                self.pool.cache_full_blocks(
                    request.block_ids[first:end],
                    request.block_hashes[first:end],
                    request.block_hashes[first - 1] if first > 0 else None,
                )
        return copies

    def free(self, request: Request) -> None:
        """Release the request's blocks tail first (its tail is evicted first); clear its table.

        ``request.block_hashes`` stays valid, so a preempted request can hit its own blocks.
        """
        self.pool.free(reversed(request.block_ids))
        request.block_ids.clear()

    def fork(self, parent: Request, child: Request) -> None:
        """Let ``child`` share the parent's KV: blocks, computed tokens and block hashes.

        Only the blocks holding the parent's computed tokens are shared — in the engine that
        is all of them; a block allocated ahead and still empty would otherwise be written
        by both. The shared partial block is copied on the first write (``allocate_slots``).
        """
        assert not child.block_ids, f"fork into request {child.request_id} that holds blocks"
        shared = parent.block_ids[: self.num_blocks_needed(parent.num_computed_tokens)]
        self.pool.touch(shared)
        child.block_ids = list(shared)
        child.num_computed_tokens = parent.num_computed_tokens
        child.block_hashes = list(parent.block_hashes)

    def _update_block_hashes(self, request: Request) -> None:
        """Hash the request's newly full blocks (only those past ``block_hashes``)."""
        hashes = request.block_hashes
        if request.num_tokens // self.block_size <= len(hashes):
            return
        hashes.extend(
            hash_full_blocks(
                request.all_token_ids,
                self.block_size,
                seed=self.hash_seed,
                extra_key=self.extra_key,
                start=len(hashes),
                parent=hashes[-1] if hashes else None,
            )
        )
