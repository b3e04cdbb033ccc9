"""The typed inputs and outputs of routing: what a replica registers and reports, and a decision.

All frozen dataclasses: they cross from the cluster shell (Redis, Ray) into the pure router,
and from the router into the frontend.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NewType

ReplicaId = NewType("ReplicaId", str)


class RoutingMode(str, Enum):
    """How well the router knows a replica's prefix cache."""

    EXACT = "exact"
    """Every KV event of the replica has been applied in order since the last resync."""
    APPROXIMATE = "approximate"
    """Events are missing (a gap, none yet, or none lately): the router guesses from its own
    recent decisions, on top of the last state it knew exactly."""

    @property
    def gauge(self) -> int:
        """A metric-friendly value: 1 for exact, 0 for approximate."""
        return 1 if self is RoutingMode.EXACT else 0


@dataclass(frozen=True)
class ReplicaRegistration:
    """What a replica announces (proto ``ReplicaRegistration``); the hash parameters must match
    the router's, and the limits are what the frontend checks requests against."""

    replica_id: str
    block_size: int
    hash_seed: bytes
    hash_version: int
    num_blocks: int
    model: str
    incarnation: str = ""
    """Changes when the replica restarts under the same id: its event ids start again at 0,
    so the router must forget what it knew (a re-registration with the same incarnation is
    only a heartbeat)."""
    max_model_len: int = 0
    vocab_size: int = 0
    max_num_seqs: int = 0
    tp: int = 1
    pp: int = 1
    device: str = ""
    """Where its shards run: "cpu" or "cuda"."""
    dtype: str = ""
    weight_bytes: int = 0
    """Weights (and buffers) over all its shards."""
    kv_cache_bytes: int = 0
    """KV cache over all its shards."""


@dataclass(frozen=True)
class ReplicaLoad:
    """A snapshot of a replica's engine (proto ``LoadReport``), made by the replica alone and
    read by the router, the metrics and the status API."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    """Blocks the engine can allocate now, including cached-but-unused ones (evictable)."""
    num_total_blocks: int
    kv_cache_usage: float
    """Fraction of blocks held by requests, in [0, 1]."""
    num_preemptions: int = 0
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    timestamp_s: float = 0.0
    """Wall clock (unix seconds) when it was taken; 0 when unknown."""
    num_restarts: int = 0
    """Times the replica restarted its shards."""
    num_pending_prefill_tokens: int = 0
    """Prompt tokens its waiting and running requests must still prefill (the queue a new
    request's prefill waits behind, in the router's cost)."""


@dataclass(frozen=True)
class RouteDecision:
    replica_id: str
    cached_blocks: int
    """Leading full blocks of the prompt the router believes the replica holds."""
    cost: float
    """The policy's cost for the chosen replica (0 for policies that do not price)."""
    mode: str
    """``RoutingMode`` value of the chosen replica when it was chosen."""


@dataclass(frozen=True)
class ReplicaRouteStatus:
    """What the router knows of one replica."""

    replica_id: str
    mode: RoutingMode
    model: str
    load: ReplicaLoad
    in_flight: int
    """Requests this router sent there that have not finished."""
    blocks_indexed: int
    """Blocks known from the replica's KV events (exact)."""
    blocks_guessed: int
    """Blocks guessed from the router's own recent decisions (approximate, with expiry)."""
    next_event_id: int | None

    @property
    def exact(self) -> int:
        """1 in exact mode, 0 in approximate: the metric's value."""
        return self.mode.gauge


@dataclass(frozen=True)
class RouterStatus:
    policy: str
    block_size: int
    observed_osl_quantile: float | None
    replicas: tuple[ReplicaRouteStatus, ...]
    """By replica id."""

    def replica(self, replica_id: str) -> ReplicaRouteStatus:
        for r in self.replicas:
            if r.replica_id == replica_id:
                return r
        raise KeyError(f"replica {replica_id!r} is not registered; registered: {[r.replica_id for r in self.replicas]}")


class NoReplicaError(RuntimeError):
    """No registered replica is left to route to (none registered, or all excluded)."""
