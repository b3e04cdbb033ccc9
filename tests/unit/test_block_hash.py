"""The chained block hash the engine's prefix cache and the router's index share."""

import pytest

from kvtide.proto.block_hash import block_hash, hash_full_blocks, root_hash

BLOCK_SIZE = 4
TOKENS = list(range(100, 116))  # 4 full blocks


def test_one_hash_per_full_block_and_chained():
    hashes = hash_full_blocks(TOKENS, BLOCK_SIZE)
    assert len(hashes) == 4
    assert len(set(hashes)) == 4
    assert all(len(h) == 32 for h in hashes)
    assert hashes[0] == block_hash(root_hash(), TOKENS[:4])
    assert hashes[1] == block_hash(hashes[0], TOKENS[4:8])


def test_same_prefix_same_hashes():
    a = hash_full_blocks(TOKENS[:8] + [1, 2, 3, 4], BLOCK_SIZE)
    b = hash_full_blocks(TOKENS[:8] + [5, 6, 7, 8], BLOCK_SIZE)
    assert a[:2] == b[:2]
    assert a[2] != b[2]


def test_change_in_first_block_changes_every_later_hash():
    changed = list(TOKENS)
    changed[1] += 1
    a = hash_full_blocks(TOKENS, BLOCK_SIZE)
    b = hash_full_blocks(changed, BLOCK_SIZE)
    assert all(x != y for x, y in zip(a, b, strict=True))


def test_same_block_tokens_under_another_parent_differ():
    # Block 1 repeats block 0's tokens; its hash still differs because the parent does.
    hashes = hash_full_blocks([7, 7, 7, 7] * 2, BLOCK_SIZE)
    assert hashes[0] != hashes[1]


def test_extra_key_and_seed_separate_caches():
    plain = hash_full_blocks(TOKENS, BLOCK_SIZE)
    keyed = hash_full_blocks(TOKENS, BLOCK_SIZE, extra_key=b"lora-a")
    other_key = hash_full_blocks(TOKENS, BLOCK_SIZE, extra_key=b"lora-b")
    seeded = hash_full_blocks(TOKENS, BLOCK_SIZE, seed=b"deployment-1")
    all_hashes = plain + keyed + other_key + seeded
    assert len(set(all_hashes)) == len(all_hashes)
    assert hash_full_blocks(TOKENS, BLOCK_SIZE, seed=b"s", extra_key=b"k") == hash_full_blocks(
        TOKENS, BLOCK_SIZE, seed=b"s", extra_key=b"k"
    )


def test_incremental_equals_full_recompute():
    full = hash_full_blocks(TOKENS, BLOCK_SIZE, seed=b"s", extra_key=b"k")
    head = hash_full_blocks(TOKENS[:9], BLOCK_SIZE, seed=b"s", extra_key=b"k")
    tail = hash_full_blocks(
        TOKENS, BLOCK_SIZE, seed=b"s", extra_key=b"k", start=len(head), parent=head[-1]
    )
    assert head == full[:2]
    assert head + tail == full


def test_partial_trailing_block_not_hashed():
    assert hash_full_blocks(TOKENS[:7], BLOCK_SIZE) == hash_full_blocks(TOKENS[:4], BLOCK_SIZE)
    assert hash_full_blocks(TOKENS[:3], BLOCK_SIZE) == []
    assert hash_full_blocks([], BLOCK_SIZE) == []


def test_token_boundaries_are_unambiguous():
    # Token ids are packed at fixed width, so (1, 23) and (12, 3) cannot collide.
    assert hash_full_blocks([1, 23], 2) != hash_full_blocks([12, 3], 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_size must be positive, got 0"):
        hash_full_blocks(TOKENS, 0)
    with pytest.raises(ValueError, match="parent is required"):
        hash_full_blocks(TOKENS, BLOCK_SIZE, start=1)
