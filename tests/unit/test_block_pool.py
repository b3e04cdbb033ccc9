"""BlockPool: exact block ids, LRU eviction order and KV events."""

import pytest

from kvtide.proto.block_hash import BlockHash
from kvtide.proto.kv_events import AllBlocksCleared, BlocksRemoved, BlocksStored
from kvtide.workers.block_pool import BlockPool


def h(i: int) -> BlockHash:
    return BlockHash(bytes([i]) * 32)


def test_allocate_takes_blocks_in_id_order():
    pool = BlockPool(5, enable_caching=True)
    assert pool.num_free_blocks == 5
    assert pool.usage == 0.0
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    assert [pool.ref_count(b) for b in range(5)] == [1, 1, 1, 0, 0]
    assert pool.num_free_blocks == 2
    assert pool.usage == pytest.approx(0.6)


def test_allocate_too_many_raises_and_changes_nothing():
    pool = BlockPool(3, enable_caching=True)
    pool.allocate(2)
    with pytest.raises(ValueError, match="cannot allocate 2 KV blocks: only 1 of 3 are free"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    assert pool.allocate(1) == [2]


def test_bad_num_blocks():
    with pytest.raises(ValueError, match="num_blocks must be positive, got 0"):
        BlockPool(0, enable_caching=True)


def test_freed_blocks_go_to_the_back_in_free_order():
    pool = BlockPool(6, enable_caching=False)
    assert pool.allocate(4) == [0, 1, 2, 3]
    pool.free([3, 1])
    pool.free([0])
    # Never-used 4, 5 first, then in the order freed.
    assert pool.allocate(5) == [4, 5, 3, 1, 0]


def test_shared_block_is_free_only_at_ref_zero():
    pool = BlockPool(2, enable_caching=False)
    (b,) = pool.allocate(1)
    pool.touch([b])
    assert pool.ref_count(b) == 2
    pool.free([b])
    assert pool.ref_count(b) == 1
    assert pool.num_free_blocks == 1
    pool.free([b])
    assert pool.ref_count(b) == 0
    assert pool.num_free_blocks == 2


def test_cache_full_blocks_emits_stored_in_chain_order():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.allocate(3)
    pool.cache_full_blocks(blocks[:2], [h(1), h(2)], parent_hash=None)
    pool.cache_full_blocks(blocks[2:], [h(3)], parent_hash=h(2))
    assert pool.take_events() == [
        BlocksStored(0, (h(1), h(2)), None),
        BlocksStored(1, (h(3),), h(2)),
    ]
    assert pool.take_events() == []
    assert [pool.cached_hash(b) for b in blocks] == [h(1), h(2), h(3)]
    assert pool.get_cached_block(h(2)) == 1
    assert pool.get_cached_block(h(9)) is None
    assert dict(pool.cached_blocks) == {h(1): 0, h(2): 1, h(3): 2}


def test_already_cached_block_is_skipped():
    pool = BlockPool(3, enable_caching=True)
    blocks = pool.allocate(2)
    pool.cache_full_blocks(blocks[:1], [h(1)], None)
    pool.cache_full_blocks(blocks, [h(1), h(2)], None)
    assert pool.take_events() == [
        BlocksStored(0, (h(1),), None),
        BlocksStored(1, (h(2),), h(1)),
    ]
    pool.cache_full_blocks(blocks, [h(1), h(2)], None)
    assert pool.take_events() == []


def test_duplicate_hash_keeps_the_first_block():
    pool = BlockPool(4, enable_caching=True)
    a, b, c = pool.allocate(3)
    pool.cache_full_blocks([a], [h(1)], None)
    pool.take_events()
    # b holds the same content as a (computed twice); c continues b's chain.
    pool.cache_full_blocks([b, c], [h(1), h(2)], None)
    assert pool.get_cached_block(h(1)) == a
    assert pool.cached_hash(b) is None
    assert pool.cached_hash(c) == h(2)
    assert pool.take_events() == [BlocksStored(1, (h(2),), h(1))]
    # The duplicate is an ordinary uncached block once freed: reusing it evicts nothing.
    pool.free([b])
    pool.allocate(1)  # block 3, never used
    assert pool.allocate(1) == [b]
    assert pool.take_events() == []


def test_stored_event_splits_where_a_middle_hash_is_skipped():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.allocate(4)
    pool.cache_full_blocks([blocks[3]], [h(2)], h(1))
    pool.cache_full_blocks(blocks[:3], [h(1), h(2), h(3)], None)
    assert pool.take_events() == [
        BlocksStored(0, (h(2),), h(1)),
        BlocksStored(1, (h(1),), None),
        BlocksStored(2, (h(3),), h(2)),
    ]


def test_cached_free_block_is_hit_and_revived_by_touch():
    pool = BlockPool(3, enable_caching=True)
    a, b = pool.allocate(2)
    pool.cache_full_blocks([a], [h(1)], None)
    pool.free([a, b])
    assert pool.num_free_blocks == 3
    assert pool.get_cached_block(h(1)) == a
    pool.touch([a])
    assert pool.ref_count(a) == 1
    assert pool.num_free_blocks == 2
    # a left the free queue: the next allocations skip it.
    assert pool.allocate(2) == [2, b]
    assert pool.get_cached_block(h(1)) == a
    assert pool.take_events() == [BlocksStored(0, (h(1),), None)]


def test_eviction_follows_free_order_and_emits_removed():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.allocate(4)
    pool.cache_full_blocks(blocks, [h(1), h(2), h(3), h(4)], None)
    pool.free([3, 2])
    pool.free([0, 1])
    assert pool.take_events() == [BlocksStored(0, (h(1), h(2), h(3), h(4)), None)]
    assert pool.allocate(1) == [3]
    assert pool.take_events() == [BlocksRemoved(1, (h(4),))]
    assert pool.get_cached_block(h(4)) is None
    assert pool.cached_hash(3) is None
    # The rest still hit until evicted; one event lists all hashes one call evicted.
    assert pool.get_cached_block(h(1)) == 0
    assert pool.allocate(3) == [2, 0, 1]
    assert pool.take_events() == [BlocksRemoved(2, (h(3), h(1), h(2)))]
    assert dict(pool.cached_blocks) == {}


def test_uncached_free_block_is_evicted_silently():
    pool = BlockPool(2, enable_caching=True)
    pool.free(pool.allocate(2))
    assert pool.allocate(2) == [0, 1]
    assert pool.take_events() == []


def test_event_ids_are_contiguous_across_kinds_and_drains():
    pool = BlockPool(2, enable_caching=True)
    a, b = pool.allocate(2)
    pool.cache_full_blocks([a], [h(1)], None)
    pool.cache_full_blocks([b], [h(2)], h(1))
    first = pool.take_events()
    pool.free([b, a])
    pool.allocate(1)
    pool.free([b])
    assert pool.reset_prefix_cache()
    second = pool.take_events()
    assert [e.event_id for e in first + second] == [0, 1, 2, 3]
    assert second == [BlocksRemoved(2, (h(2),)), AllBlocksCleared(3)]


def test_reset_prefix_cache_refuses_while_blocks_are_in_use():
    pool = BlockPool(3, enable_caching=True)
    a, b = pool.allocate(2)
    pool.cache_full_blocks([a, b], [h(1), h(2)], None)
    pool.free([b])
    pool.take_events()
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(h(1)) == a
    assert pool.get_cached_block(h(2)) == b
    assert pool.take_events() == []
    pool.free([a])
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(h(1)) is None
    assert [pool.cached_hash(x) for x in range(3)] == [None, None, None]
    assert pool.take_events() == [AllBlocksCleared(1)]
    # Clearing keeps the free order and evicts nothing more.
    assert pool.allocate(3) == [2, 1, 0]
    assert pool.take_events() == []


def test_caching_off_caches_nothing():
    pool = BlockPool(3, enable_caching=False)
    blocks = pool.allocate(2)
    pool.cache_full_blocks(blocks, [h(1), h(2)], None)
    assert pool.get_cached_block(h(1)) is None
    assert pool.cached_hash(blocks[0]) is None
    pool.free(blocks)
    assert pool.allocate(3) == [2, 0, 1]
    assert pool.take_events() == []
