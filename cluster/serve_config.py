"""``kvtide serve``'s configuration: one frozen dataclass, typed end to end (the engine's part is
an ``EngineConfig``, resolved once when the server starts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvtide.cluster.frontend.requests import FrontendConfig
from kvtide.cluster.state.health import SupervisionConfig
from kvtide.workers import EngineConfig


class StartupError(RuntimeError):
    """``kvtide serve`` could not start; the message says what did not finish and where to look."""


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Every replica's engine; ``engine.model.model`` is what is served, under that name."""
    num_replicas: int = 1
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    """0 picks a free port."""
    http_port: int = 8000
    address: str | None = None
    """An existing Ray cluster to join; None starts a private one on loopback."""
    redis_url: str | None = None
    """None starts an embedded redis-server on loopback; "" runs without Redis."""
    routing_policy: str = "kv_aware"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    drain_timeout_s: float = 30.0
    replica_start_timeout_s: float = 600.0
    stats_interval_s: float = 2.0
    """How often replica loads are polled when there is no Redis to publish them."""
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")

    @property
    def model(self) -> str:
        return self.engine.model.model

    @property
    def tp(self) -> int:
        return self.engine.parallel.tensor_parallel_size

    @property
    def pp(self) -> int:
        return self.engine.parallel.pipeline_parallel_size
