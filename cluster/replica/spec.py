"""What starts a replica and each of its shards: one frozen spec each, the engine configuration
resolved once by whoever starts the replica (every option under one name and one type)."""

from __future__ import annotations

from dataclasses import dataclass

from kvtide.workers import EngineConfig, ResolvedConfig, resolve_engine


@dataclass(frozen=True)
class ReplicaSpec:
    config: ResolvedConfig
    """Its layout too: ``config.engine.parallel``."""
    cpus_per_shard: float = 1.0
    start_timeout_s: float = 300.0
    """How long its shards may take to start: placement, process groups, weights, CPU kernels."""
    placement_owner: str = ""
    """Names the shards' placement groups (``placement.remove_groups``), so whoever started the
    replica can free them if it dies."""
    model_name: str = ""
    """The name it serves under (default: the model directory's name)."""

    @property
    def tp(self) -> int:
        return self.config.engine.parallel.tensor_parallel_size

    @property
    def pp(self) -> int:
        return self.config.engine.parallel.pipeline_parallel_size

    @classmethod
    def load(cls, model: str = "smollm2-135m", tp: int = 1, pp: int = 1, **options) -> ReplicaSpec:
        """Resolve ``model`` with flat ``EngineConfig`` options; the rest are this spec's fields."""
        own = {k: options.pop(k) for k in ("cpus_per_shard", "start_timeout_s", "placement_owner", "model_name")
               if k in options}  # fmt: skip
        engine = EngineConfig.from_kwargs(model=model, tensor_parallel_size=tp, pipeline_parallel_size=pp, **options)
        return cls(resolve_engine(engine), **own)


@dataclass(frozen=True)
class ShardSpec:
    """One shard: one tensor-parallel rank of one pipeline stage of a replica."""

    config: ResolvedConfig
    tp_size: int
    pp_size: int
    stage: int
    tp_rank: int
    host: str
    """The IP of this shard's node on the network Ray uses; collectives bind to it."""
    use_gpu: bool = False

    def __post_init__(self) -> None:
        if not (0 <= self.stage < self.pp_size and 0 <= self.tp_rank < self.tp_size):
            raise ValueError(
                f"shard (stage {self.stage}, tp_rank {self.tp_rank}) is outside a "
                f"tp={self.tp_size} x pp={self.pp_size} replica"
            )

    @property
    def rank(self) -> int:
        return self.stage * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size
