"""KVCacheManager: prefix sharing, the last-token cap, all-or-nothing allocation, fork + CoW."""

import pytest

from kvtide.proto.block_hash import hash_full_blocks
from kvtide.proto.kv_events import BlocksRemoved, BlocksStored
from kvtide.workers.kv_cache_manager import ComputedBlocks, KVCacheManager
from kvtide.workers.request import Request, RequestId
from kvtide.workers.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(rid: str, prompt: list[int]) -> Request:
    return Request(RequestId(rid), list(prompt), SamplingParams())


def schedule(kv: KVCacheManager, req: Request, num_new_tokens: int | None = None):
    """What the scheduler does: adopt hits on first schedule, allocate, advance."""
    computed = kv.get_computed_blocks(req) if not req.block_ids else None
    base = computed.num_computed_tokens if computed else req.num_computed_tokens
    if num_new_tokens is None:
        num_new_tokens = req.num_tokens - base
    copies = kv.allocate_slots(req, num_new_tokens, computed)
    if copies is not None:
        req.num_computed_tokens += num_new_tokens
    return copies


def test_num_blocks_needed():
    kv = KVCacheManager(8, BLOCK_SIZE, enable_prefix_caching=True)
    assert [kv.num_blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="block_size must be positive, got 0"):
        KVCacheManager(8, 0, enable_prefix_caching=True)


def test_requests_sharing_a_prefix_share_blocks():
    kv = KVCacheManager(10, BLOCK_SIZE, enable_prefix_caching=True)
    prefix = list(range(8))
    a = make_request("a", prefix + [100, 101, 102])
    b = make_request("b", prefix + [200])

    assert kv.get_computed_blocks(a) == ComputedBlocks([], 0)
    assert schedule(kv, a) == []
    assert a.block_ids == [0, 1, 2]
    assert a.block_hashes == hash_full_blocks(a.all_token_ids, BLOCK_SIZE)
    assert kv.take_events() == [BlocksStored(0, tuple(a.block_hashes), None)]

    computed = kv.get_computed_blocks(b)
    assert computed == ComputedBlocks([0, 1], 8)
    assert [kv.pool.ref_count(x) for x in (0, 1)] == [1, 1]  # lookup does not touch
    assert kv.allocate_slots(b, 1, computed) == []
    assert b.block_ids == [0, 1, 3]
    assert b.num_computed_tokens == 8
    assert b.num_cached_prompt_tokens == 8
    assert [kv.pool.ref_count(x) for x in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert kv.take_events() == []  # b's last block is partial


def test_hashes_and_extra_key_follow_the_manager_settings():
    a = make_request("a", list(range(9)))
    kv = KVCacheManager(8, BLOCK_SIZE, True, hash_seed=b"s", extra_key=b"k")
    schedule(kv, a)
    assert a.block_hashes == hash_full_blocks(
        a.all_token_ids, BLOCK_SIZE, seed=b"s", extra_key=b"k"
    )
    other = KVCacheManager(8, BLOCK_SIZE, True, extra_key=b"other")
    schedule(other, make_request("x", list(range(9))))
    assert other.get_computed_blocks(make_request("y", list(range(9)))).num_computed_tokens == 8
    # Same tokens under another extra key miss.
    b = make_request("b", list(range(9)))
    b.block_hashes = hash_full_blocks(b.all_token_ids, BLOCK_SIZE, extra_key=b"other")
    assert kv.get_computed_blocks(b) == ComputedBlocks([], 0)


def test_last_token_is_never_served_from_cache():
    kv = KVCacheManager(8, BLOCK_SIZE, enable_prefix_caching=True)
    prompt = list(range(8))  # exactly two full blocks
    a = make_request("a", prompt)
    schedule(kv, a)
    assert a.block_ids == [0, 1]
    assert kv.pool.cached_hash(1) == a.block_hashes[1]

    b = make_request("b", prompt)
    computed = kv.get_computed_blocks(b)
    assert computed == ComputedBlocks([0], 4)
    assert kv.allocate_slots(b, 4, computed) == []
    # Block 1's content is recomputed into a fresh block: a duplicate, left uncached.
    assert b.block_ids == [0, 2]
    assert kv.pool.cached_hash(2) is None
    assert kv.pool.get_cached_block(b.block_hashes[1]) == 1


def test_allocate_slots_returns_none_and_changes_nothing_when_short():
    kv = KVCacheManager(4, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_request("a", list(range(8)) + [50])
    schedule(kv, a)  # blocks 0, 1, 2
    kv.free(a)  # all free; 0 and 1 cached
    kv.take_events()
    b = make_request("b", list(range(8)) + list(range(60, 69)))  # 17 tokens: 5 blocks
    computed = kv.get_computed_blocks(b)
    assert computed == ComputedBlocks([0, 1], 8)
    # 4 free blocks, but touching 0 and 1 leaves 2 for the 3 more b needs.
    assert kv.allocate_slots(b, 9, computed) is None
    assert b.block_ids == []
    assert b.num_computed_tokens == 0
    assert b.num_cached_prompt_tokens == 0
    assert kv.num_free_blocks == 4
    assert [kv.pool.ref_count(x) for x in range(4)] == [0, 0, 0, 0]
    assert kv.take_events() == []
    # A smaller chunk fits.
    assert kv.allocate_slots(b, 8, computed) == []
    assert b.block_ids == [0, 1, 3, 2]
    assert kv.num_free_blocks == 0
    assert kv.usage == 1.0


def test_running_request_grows_and_caches_blocks_as_they_fill():
    kv = KVCacheManager(4, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_request("a", [1, 2, 3])
    schedule(kv, a)
    assert a.block_ids == [0]
    assert kv.take_events() == []
    a.append_output_token(4)
    assert schedule(kv, a, 1) == []  # fills block 0
    assert a.block_ids == [0]
    assert kv.take_events() == [BlocksStored(0, (a.block_hashes[0],), None)]
    a.append_output_token(5)
    schedule(kv, a, 1)
    assert a.block_ids == [0, 1]
    assert len(a.block_hashes) == 1
    assert kv.take_events() == []


def test_free_releases_tail_first_and_blocks_are_reused_lru():
    kv = KVCacheManager(6, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_request("a", list(range(12)) + [99])  # 4 blocks, 3 full
    schedule(kv, a)
    assert a.block_ids == [0, 1, 2, 3]
    hashes = list(a.block_hashes)
    kv.take_events()
    kv.free(a)
    assert a.block_ids == []
    assert a.block_hashes == hashes
    assert kv.num_free_blocks == 6
    # Never-used 4, 5 first, then a's blocks tail first: 3 (uncached), 2, 1, 0.
    c = make_request("c", list(range(500, 520)))
    schedule(kv, c, 16)
    assert c.block_ids == [4, 5, 3, 2]
    assert kv.take_events() == [
        BlocksRemoved(1, (hashes[2],)),
        BlocksStored(2, tuple(c.block_hashes[:4]), None),
    ]
    # a's first two blocks still hit.
    assert kv.get_computed_blocks(make_request("d", list(range(12)))) == ComputedBlocks([0, 1], 8)


def test_preempted_request_rehits_its_own_blocks():
    kv = KVCacheManager(8, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_request("a", list(range(6)))
    schedule(kv, a)
    for token in (6, 7, 8):
        a.append_output_token(token)
        schedule(kv, a, 1)
    assert a.block_ids == [0, 1, 2]
    assert a.num_computed_tokens == 9
    # Preempt: free, and the scheduler forgets the computed tokens.
    kv.free(a)
    a.num_computed_tokens = 0
    a.append_output_token(9)  # the token sampled in the last step
    computed = kv.get_computed_blocks(a)
    assert computed == ComputedBlocks([0, 1], 8)
    assert kv.allocate_slots(a, 2, computed) == []
    # The partial tail goes to a never-used block, not back to the freed block 2.
    assert a.block_ids == [0, 1, 3]
    assert a.num_computed_tokens == 8
    assert a.num_cached_prompt_tokens == 6


def test_fork_shares_blocks_and_copy_on_write_splits_the_partial_block():
    kv = KVCacheManager(8, BLOCK_SIZE, enable_prefix_caching=True)
    parent = make_request("p", list(range(6)))
    schedule(kv, parent)
    assert parent.block_ids == [0, 1]
    child = make_request("c", list(range(6)))
    kv.fork(parent, child)
    assert child.block_ids == [0, 1]
    assert child.num_computed_tokens == 6
    assert child.block_hashes == parent.block_hashes
    assert child.block_hashes is not parent.block_hashes
    assert [kv.pool.ref_count(b) for b in (0, 1)] == [2, 2]

    # The child writes into shared partial block 1 first: it gets a copy.
    child.append_output_token(70)
    assert schedule(kv, child, 1) == [(1, 2)]
    assert child.block_ids == [0, 2]
    assert [kv.pool.ref_count(b) for b in (0, 1, 2)] == [2, 1, 1]
    # The parent now owns block 1 alone and writes in place.
    parent.append_output_token(80)
    assert schedule(kv, parent, 1) == []
    assert parent.block_ids == [0, 1]
    # Full shared blocks are never copied: appending after a block boundary just allocates.
    parent.append_output_token(81)
    parent.append_output_token(82)
    schedule(kv, parent, 2)
    assert parent.block_ids == [0, 1, 3]
    assert kv.pool.cached_hash(1) == parent.block_hashes[1]

    kv.free(child)
    assert [kv.pool.ref_count(b) for b in (0, 1, 2, 3)] == [1, 1, 0, 1]
    kv.free(parent)
    assert kv.num_free_blocks == 8


def test_copy_on_write_counts_its_block_before_mutating():
    kv = KVCacheManager(2, BLOCK_SIZE, enable_prefix_caching=False)
    parent = make_request("p", [1, 2])
    schedule(kv, parent)
    child = make_request("c", [1, 2])
    kv.fork(parent, child)
    kv.allocate_slots(make_request("x", [5]), 1)  # takes the last free block
    child.append_output_token(3)
    assert kv.allocate_slots(child, 1) is None
    assert child.block_ids == [0]
    assert kv.pool.ref_count(0) == 2


def test_caching_off():
    kv = KVCacheManager(8, BLOCK_SIZE, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    schedule(kv, a)
    b = make_request("b", list(range(9)))
    assert kv.get_computed_blocks(b) == ComputedBlocks([], 0)
    schedule(kv, b)
    assert b.block_ids == [3, 4, 5]
    assert kv.take_events() == []
    assert kv.pool.cached_hash(0) is None


def test_reset_prefix_cache():
    kv = KVCacheManager(4, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_request("a", list(range(5)))
    schedule(kv, a)
    assert kv.reset_prefix_cache() is False
    kv.free(a)
    assert kv.reset_prefix_cache() is True
    assert kv.get_computed_blocks(make_request("b", list(range(5)))) == ComputedBlocks([], 0)
