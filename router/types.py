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
    """What a replica announces; the hash parameters must match the router's."""

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


@dataclass(frozen=True)
class ReplicaLoad:
    """A snapshot of a replica's engine (``EngineStats`` plus the cache size)."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    """Blocks the engine can allocate now, including cached-but-unused ones (evictable)."""
    num_total_blocks: int
    kv_cache_usage: float
    """Fraction of blocks held by requests, in [0, 1]."""
    num_preemptions: int = 0


@dataclass(frozen=True)
class RouteDecision:
    replica_id: str
    cached_blocks: int
    """Leading full blocks of the prompt the router believes the replica holds."""
    cost: float
    """The policy's cost for the chosen replica (0 for policies that do not price)."""
    mode: str
    """``RoutingMode`` value of the chosen replica when it was chosen."""


class NoReplicaError(RuntimeError):
    """No registered replica is left to route to (none registered, or all excluded)."""
