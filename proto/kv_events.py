"""Typed KV-cache events a replica emits for the router's prefix index.

Each event carries a per-replica ``event_id`` that increases by one per event, so a consumer
that sees a gap knows it missed something and must resync from a snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtide.proto.block_hash import BlockHash


@dataclass(frozen=True, slots=True)
class BlocksStored:
    """Full blocks became reusable (cached) under these hashes, in chain order."""

    event_id: int
    block_hashes: tuple[BlockHash, ...]
    parent_hash: BlockHash | None
    """Hash of the block before the first one here; None when the chain starts at the root."""


@dataclass(frozen=True, slots=True)
class BlocksRemoved:
    """Cached blocks were evicted; their hashes no longer hit on this replica."""

    event_id: int
    block_hashes: tuple[BlockHash, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The replica dropped its whole prefix cache."""

    event_id: int


KvEvent = BlocksStored | BlocksRemoved | AllBlocksCleared
