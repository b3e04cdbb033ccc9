"""A replica's health, as the replica reports it to the frontend's supervisor (a frozen message
both processes know: it lives with the cluster's shared state), and how the supervisor acts on it."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ReplicaState(str, enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    RESTARTING = "restarting"
    """Its shards failed and fresh ones are starting (after a backoff)."""
    WAITING_FOR_RESOURCES = "waiting_for_resources"
    """Its shards cannot be placed: the cluster lacks the CPUs/GPUs a stage needs."""
    BROKEN = "broken"
    """Its shards failed too often in a row, or its actor died too often (a crash-loop breaker);
    it is not restarted again."""
    DEAD = "dead"
    """Its actor died; the supervisor is making it anew."""


@dataclass(frozen=True)
class ReplicaHealth:
    state: ReplicaState
    healthy: bool
    """Fit to take requests now: serving, its engine loop going round, every shard answering."""
    reason: str = ""
    """Why it is not healthy (empty when it is)."""
    num_restarts: int = 0
    """Times its shards were restarted."""


@dataclass(frozen=True)
class SupervisionConfig:
    interval_s: float = 2.0
    """How often every replica's health is checked."""
    check_timeout_s: float = 30.0
    """A replica that does not answer its health check within this is not fit to serve (it pings
    its shards for up to 20 s of it)."""
    backoff_s: float = 2.0
    """The wait before making a dead replica anew; doubles with each recent recreation."""
    max_backoff_s: float = 60.0
    max_recreations: int = 3
    """The crash-loop breaker: a replica that died this many times within ``window_s`` and dies
    again is left dead (and reported) instead of made anew."""
    window_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("interval_s", "check_timeout_s", "backoff_s", "max_backoff_s", "window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"supervision {name} must be > 0, got {getattr(self, name)}")
        if self.max_recreations < 0:
            raise ValueError(f"supervision max_recreations must be >= 0, got {self.max_recreations}")
