"""A model replica: one Engine (scheduler, KV blocks, sampler) driving its Ray shard workers.

``Replica`` is a plain class; ``ReplicaActor = ray.remote(Replica)`` is the Ray actor. It
streams per-request deltas through Ray streaming generators and never blocks its event loop:
the engine steps on its own thread (``AsyncEngine``), and only the stepping thread waits on
the workers.

Failure: if any shard raises or dies during a step, the engine fails every running request
with a clear error, the executor tears down all of the replica's shards (survivors may be
stuck in a collective with the lost one) and starts fresh ones, and the replica goes on
serving; the next request succeeds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import ray
import torch

from kvtide.cluster.executor import RayExecutor
from kvtide.cluster.placement import ReplicaShape
from kvtide.workers.async_engine import AsyncEngine
from kvtide.workers.config import EngineConfig, resolve
from kvtide.workers.engine import Engine, EngineStats
from kvtide.workers.model_files import resolve_model
from kvtide.workers.model_loader import read_hf_config
from kvtide.workers.outputs import CompletionDelta
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.step_inputs import StepInputs
from kvtide.workers.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaInfo:
    tp: int
    pp: int
    num_blocks: int
    block_size: int
    shard_nodes: dict[tuple[int, int], str]
    """(stage, tp_rank) -> Ray node id."""


class _RestartingExecutor:
    """The engine's executor: the replica's Ray workers, restarted whole after a failure."""

    device = torch.device("cpu")

    def __init__(self, start) -> None:
        self._start = start
        self.workers: RayExecutor = start()
        self.num_restarts = 0

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        try:
            return self.workers.execute(inputs)
        except Exception:
            logger.exception("a shard failed; restarting every shard of the replica")
            self.workers.shutdown()
            self.workers = self._start()
            self.num_restarts += 1
            raise


class Replica:
    def __init__(
        self,
        model: str = "smollm2-135m",
        tp: int = 1,
        pp: int = 1,
        cpus_per_shard: float = 1.0,
        start_timeout_s: float = 300.0,
        **engine_options,
    ) -> None:
        model_dir = resolve_model(model)
        config = EngineConfig.from_kwargs(model=str(model_dir), **engine_options)
        resolved = resolve(config, str(model_dir), read_hf_config(model_dir))
        self.shape = ReplicaShape(tp, pp, resolved.device.type == "cuda", cpus_per_shard)
        self.executor = _RestartingExecutor(
            lambda: RayExecutor(
                model_dir,
                self.shape,
                resolved.num_blocks,
                resolved.block_size,
                timeout_s=start_timeout_s,
                dtype=resolved.dtype,
                attention_backend=resolved.attention_backend,
            )
        )
        self.engine = Engine(resolved, self.executor, Tokenizer.from_dir(model_dir))
        self._async = AsyncEngine(self.engine)

    def info(self) -> ReplicaInfo:
        cfg = self.engine.config
        return ReplicaInfo(
            self.shape.tp, self.shape.pp, cfg.num_blocks, cfg.block_size, self.executor.workers.worker_nodes()
        )

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[CompletionDelta]:
        """Call with ``.options(num_returns="streaming")``: one Ray object per delta."""
        async for delta in self._async.generate(prompt, params, request_id):
            yield delta

    async def health(self, timeout_s: float = 60.0) -> bool:
        """Runs one real step: a 1-token greedy request through the engine and every shard."""

        async def probe() -> bool:
            params = SamplingParams(temperature=0.0, max_tokens=1)
            deltas = [d async for d in self._async.generate([1, 2, 3], params)]
            return bool(deltas) and deltas[-1].finish_reason in ("length", "stop")

        return await asyncio.wait_for(probe(), timeout_s)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def num_restarts(self) -> int:
        return self.executor.num_restarts

    def shutdown(self) -> None:
        self._async.shutdown()
        self.executor.workers.shutdown()


ReplicaActor = ray.remote(Replica)
