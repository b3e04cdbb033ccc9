"""The one block hash that the engine and the router share.

A block hash identifies a full block of token ids *and everything before it*: it chains the
parent block's hash, so two requests share a block hash only when they share the whole
prefix up to and including that block. The router's prefix index and the engine's prefix
cache key on the same bytes, so a replica's KV events can be matched against a prompt the
router has never seen executed.

NOTE: the encoding is part of the wire contract. Changing it changes every hash; bump
``HASH_VERSION`` so replicas and routers of different versions refuse to pair up.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NewType

BlockHash = NewType("BlockHash", bytes)
"""32 bytes of SHA-256."""

HASH_VERSION = 1


def root_hash(seed: bytes = b"") -> BlockHash:
    """The parent hash of the first block; the seed salts every chain (e.g. per deployment)."""
    return BlockHash(hashlib.sha256(b"kvtide-block-hash-v%d:" % HASH_VERSION + seed).digest())


def block_hash(
    parent: BlockHash,
    token_ids: Sequence[int],
    extra_key: bytes = b"",
) -> BlockHash:
    """Hash one full block: parent hash, the block's token ids, and an extra key.

    ``extra_key`` separates caches that must never share blocks although their tokens
    match (another model, a tenant salt, a LoRA adapter).
    """
    h = hashlib.sha256(parent)
    h.update(struct.pack(f"<I{len(token_ids)}I", len(token_ids), *token_ids))
    h.update(struct.pack("<I", len(extra_key)))
    h.update(extra_key)
    return BlockHash(h.digest())


def hash_full_blocks(
    token_ids: Sequence[int],
    block_size: int,
    *,
    seed: bytes = b"",
    extra_key: bytes = b"",
    start: int = 0,
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """Chained hashes of every full block of ``token_ids`` from block index ``start``.

    ``parent`` is the hash of block ``start - 1`` (ignored when ``start == 0``); the
    incremental form lets a growing request hash only its newly filled blocks.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    prev = root_hash(seed) if start == 0 else parent
    if prev is None:
        raise ValueError("parent is required when start > 0")
    hashes: list[BlockHash] = []
    for i in range(start, len(token_ids) // block_size):
        prev = block_hash(prev, token_ids[i * block_size : (i + 1) * block_size], extra_key)
        hashes.append(prev)
    return hashes
