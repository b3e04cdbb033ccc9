"""The state store's values: the Python twins (router/types.py, proto/kv_events.py) to and from
their proto messages. Everything the store writes is one of these messages, serialized."""

from __future__ import annotations

from kvtide.proto import kvtide_pb2 as pb
from kvtide.proto.block_hash import BlockHash
from kvtide.proto.kv_events import AllBlocksCleared, BlocksRemoved, BlocksStored, KvEvent
from kvtide.router import ReplicaLoad, ReplicaRegistration

_REGISTRATION_FIELDS = (
    "replica_id", "block_size", "hash_seed", "hash_version", "num_blocks", "model", "incarnation",
    "max_model_len", "vocab_size", "max_num_seqs", "tp", "pp", "device", "dtype", "weight_bytes", "kv_cache_bytes",
)  # fmt: skip
_LOAD_FIELDS = (
    "num_running", "num_waiting", "num_free_blocks", "num_total_blocks", "kv_cache_usage", "num_preemptions",
    "prefix_cache_queried_tokens", "prefix_cache_hit_tokens", "timestamp_s", "num_restarts",
    "num_pending_prefill_tokens",
)  # fmt: skip


def registration_to_proto(reg: ReplicaRegistration) -> pb.ReplicaRegistration:
    return pb.ReplicaRegistration(**{f: getattr(reg, f) for f in _REGISTRATION_FIELDS})


def registration_from_proto(msg: pb.ReplicaRegistration) -> ReplicaRegistration:
    return ReplicaRegistration(**{f: getattr(msg, f) for f in _REGISTRATION_FIELDS})


def load_to_proto(replica_id: str, load: ReplicaLoad) -> pb.LoadReport:
    return pb.LoadReport(replica_id=replica_id, **{f: getattr(load, f) for f in _LOAD_FIELDS})


def load_from_proto(msg: pb.LoadReport) -> ReplicaLoad:
    return ReplicaLoad(**{f: getattr(msg, f) for f in _LOAD_FIELDS})


def event_to_proto(replica_id: str, event: KvEvent) -> pb.KvEvent:
    msg = pb.KvEvent(replica_id=replica_id, event_id=event.event_id)
    match event:
        case BlocksStored(block_hashes=hashes, parent_hash=parent):
            msg.stored.block_hashes.extend(hashes)
            if parent is not None:
                msg.stored.parent_hash = parent
        case BlocksRemoved(block_hashes=hashes):
            msg.removed.block_hashes.extend(hashes)
        case AllBlocksCleared():
            msg.cleared.SetInParent()
        case _:
            raise TypeError(f"not a KV event: {event!r}")
    return msg


def event_from_proto(msg: pb.KvEvent) -> KvEvent:
    kind = msg.WhichOneof("kind")
    if kind == "stored":
        parent = BlockHash(msg.stored.parent_hash) if msg.stored.HasField("parent_hash") else None
        return BlocksStored(msg.event_id, tuple(BlockHash(h) for h in msg.stored.block_hashes), parent)
    if kind == "removed":
        return BlocksRemoved(msg.event_id, tuple(BlockHash(h) for h in msg.removed.block_hashes))
    if kind == "cleared":
        return AllBlocksCleared(msg.event_id)
    raise ValueError(f"KV event {msg.event_id} of replica {msg.replica_id!r} has no kind")
