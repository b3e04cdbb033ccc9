"""Runs one replica's model on Ray actors: TP shards packed per node, PP stages across nodes.

Every step goes to every shard (each holds a slice of the weights and of the KV cache), and
the logits come back from the last stage's TP rank 0. Plain actor calls, no compiled graphs.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import ray
import torch
from ray.exceptions import GetTimeoutError, RayError

from kvtide.cluster.placement import ReplicaPlacement, ReplicaShape, place_replica
from kvtide.cluster.worker_actor import WorkerActor, WorkerReady
from kvtide.workers.model_loader import read_hf_config
from kvtide.workers.models.llama import LlamaArgs
from kvtide.workers.shard import stage_layers
from kvtide.workers.step_inputs import StepInputs

RemoteWorker = ray.remote(WorkerActor)

SHUTDOWN_GRACE_S = 2.0
"""How long shards get to leave their process groups before they are killed."""


def check_shape(args: LlamaArgs, shape: ReplicaShape) -> None:
    """Raise ``ValueError`` when the model cannot be split as ``shape`` asks."""
    sizes = {
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "intermediate_size": args.intermediate_size,
    }
    if any(n % shape.tp for n in sizes.values()):
        common = math.gcd(*sizes.values())
        allowed = ", ".join(str(d) for d in range(1, common + 1) if common % d == 0)
        have = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(
            f"tensor-parallel size {shape.tp} does not evenly divide this model's {have}; "
            f"allowed tensor-parallel sizes: {allowed}"
        )
    stage_layers(args, shape.pp)  # raises when pp exceeds the layer count


class RayExecutor:
    """One replica's shards as Ray actors. Use as a context manager, or call ``shutdown()``."""

    def __init__(
        self,
        model_dir: str | Path,
        shape: ReplicaShape,
        num_blocks: int,
        block_size: int,
        timeout_s: float = 120.0,
        step_timeout_s: float = 60.0,
        dtype: torch.dtype = torch.float32,
        attention_backend: str = "torch",
    ) -> None:
        check_shape(LlamaArgs.from_hf_config(read_hf_config(model_dir)), shape)
        self.shape = shape
        self.step_timeout_s = step_timeout_s
        self._workers: list = []  # actor handles by global rank
        self.placement: ReplicaPlacement = place_replica(shape, timeout_s)
        try:
            hosts = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
            for stage in range(shape.pp):
                for tp_rank in range(shape.tp):
                    self._workers.append(
                        RemoteWorker.options(
                            scheduling_strategy=self.placement.scheduling_strategy(stage, tp_rank),
                            **shape.actor_options,
                        ).remote(
                            str(model_dir), shape.tp, shape.pp, stage, tp_rank, num_blocks,
                            block_size, hosts[self.placement.stage_nodes[stage]], shape.use_gpu, dtype,
                            attention_backend,
                        )
                    )
            address = ray.get(self._workers[0].rendezvous_address.remote(), timeout=timeout_s)
            refs = [w.init.remote(address, timeout_s) for w in self._workers]
            self.reports: list[WorkerReady] = ray.get(refs, timeout=timeout_s)
        except GetTimeoutError as e:
            self.shutdown()
            raise TimeoutError(
                f"the {shape.tp} x {shape.pp} shards did not start within {timeout_s} s"
            ) from e
        except BaseException:
            self.shutdown()
            raise
        self._last = (shape.pp - 1) * shape.tp  # rank whose execute() returns the logits

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def worker_nodes(self) -> dict[tuple[int, int], str]:
        """(stage, tp_rank) -> hex id of the node the shard runs on."""
        return {(r.stage, r.tp_rank): r.node_id for r in self.reports}

    def worker_pids(self) -> dict[tuple[int, int], int]:
        return {(r.stage, r.tp_rank): r.pid for r in self.reports}

    def inject_failure(self, stage: int, tp_rank: int, after_num_steps: int = 0) -> ray.ObjectRef:
        """Test-only: make one shard raise in a coming step (``WorkerActor.inject_failure``).
        Returns the call's ref; the failure is armed once it resolves."""
        if not (0 <= stage < self.shape.pp and 0 <= tp_rank < self.shape.tp):
            raise ValueError(
                f"no shard (stage {stage}, tp_rank {tp_rank}) in a "
                f"tp={self.shape.tp} x pp={self.shape.pp} replica"
            )
        if not self._workers:
            raise RuntimeError("the executor is shut down")
        return self._workers[stage * self.shape.tp + tp_rank].inject_failure.remote(after_num_steps)

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Run one step on every shard; logits [num_sampled_seqs, vocab]. Raises the first
        shard failure (after which the replica must be shut down: its peers may be stuck)."""
        refs = self._submit(inputs)
        results: dict = {}
        deadline = time.monotonic() + self.step_timeout_s
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise self._timeout(refs, pending)
            try:
                results[done[0]] = ray.get(done[0])
            except RayError as e:
                raise self._failure(refs.index(done[0]), e) from e
        return results[refs[self._last]]

    async def execute_async(self, inputs: StepInputs) -> torch.Tensor:
        """``execute`` for an event loop: awaits the shards, never blocks the loop."""
        refs = self._submit(inputs)
        futures = [asyncio.wrap_future(ref.future()) for ref in refs]
        done, pending = await asyncio.wait(
            futures, timeout=self.step_timeout_s, return_when=asyncio.FIRST_EXCEPTION
        )
        for rank, future in enumerate(futures):
            if future in done and future.exception() is not None:
                for p in pending:
                    p.cancel()
                raise self._failure(rank, future.exception()) from future.exception()
        if pending:
            for p in pending:
                p.cancel()
            raise self._timeout(refs, [refs[futures.index(p)] for p in pending])
        return futures[self._last].result()

    def shutdown(self) -> None:
        """Leave the process groups, kill every shard and free the placement (idempotent)."""
        workers, self._workers = self._workers, []
        if workers:
            refs = [w.shutdown.remote() for w in workers]
            ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_GRACE_S)
            for w in workers:
                ray.kill(w, no_restart=True)
        self.placement.remove()

    def _submit(self, inputs: StepInputs) -> list:
        if not self._workers:
            raise RuntimeError("the executor is shut down")
        shared = ray.put(inputs)  # serialized once, read by every shard
        return [w.execute.remote(shared) for w in self._workers]

    def _shard(self, rank: int) -> str:
        return f"stage {rank // self.shape.tp}, tp_rank {rank % self.shape.tp}"

    def _failure(self, rank: int, error: BaseException) -> RuntimeError:
        return RuntimeError(f"shard ({self._shard(rank)}) failed the step: {error}")

    def _timeout(self, refs: list, pending: list) -> TimeoutError:
        late = ", ".join(f"({self._shard(refs.index(r))})" for r in pending)
        return TimeoutError(f"step did not finish within {self.step_timeout_s} s on shards {late}")
