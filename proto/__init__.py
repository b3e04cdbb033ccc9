"""kvtide.proto: the wire schema and the contracts both ends of a wire share."""

from kvtide.proto.block_hash import BlockHash, block_hash, hash_full_blocks, root_hash
from kvtide.proto.kv_events import AllBlocksCleared, BlocksRemoved, BlocksStored, KvEvent

__all__ = [
    "AllBlocksCleared",
    "BlockHash",
    "BlocksRemoved",
    "BlocksStored",
    "KvEvent",
    "block_hash",
    "hash_full_blocks",
    "root_hash",
]
