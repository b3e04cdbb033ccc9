"""Runs one replica's model on Ray actors: TP shards packed per node, PP stages across nodes.

Every step goes to every shard (each holds a slice of the weights and of the KV cache), and
the sampled tokens come back from the last stage's TP rank 0, which samples on its own device.
Plain actor calls, no compiled graphs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable

import ray
import torch

from kvtide.cluster.replica.logs import ray_logs_hint
from kvtide.cluster.replica.placement import ReplicaPlacement, ReplicaShape, place_replica
from kvtide.cluster.replica.shard_actor import ShardActor, ShardReady
from kvtide.cluster.replica.spec import ShardSpec
from kvtide.workers import LlamaArgs, ResolvedConfig, StepDelta, StepOutput, kv_plan, stage_layers
from ray.exceptions import GetTimeoutError, RayActorError, RayError

logger = logging.getLogger(__name__)

RemoteShard = ray.remote(ShardActor)

SHUTDOWN_GRACE_S = 2.0
"""How long shards get to leave their process groups before they are killed."""
EXIT_TIMEOUT_S = 30.0
"""How long a killed shard's process may take to be gone."""


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
        config: ResolvedConfig,
        shape: ReplicaShape,
        timeout_s: float = 120.0,
        step_timeout_s: float = 60.0,
        max_in_flight: int | None = None,
        placement_owner: str = "",
        on_waiting: Callable[[], None] | None = None,
    ) -> None:
        """``on_waiting`` hears when the cluster cannot place the shards yet."""
        check_shape(LlamaArgs.from_hf_config(config.hf_config), shape)
        self.shape = shape
        self.step_timeout_s = step_timeout_s
        self._workers: list = []  # actor handles by global rank
        self.placement: ReplicaPlacement = place_replica(shape, timeout_s, placement_owner, on_waiting)
        try:
            hosts = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
            for stage in range(shape.pp):
                for tp_rank in range(shape.tp):
                    self._workers.append(
                        RemoteShard.options(
                            scheduling_strategy=self.placement.scheduling_strategy(stage, tp_rank),
                            **shape.actor_options,
                        ).remote(
                            ShardSpec(
                                config, shape.tp, shape.pp, stage, tp_rank,
                                hosts[self.placement.stage_nodes[stage]], shape.use_gpu,
                            )  # fmt: skip
                        )
                    )
            address = ray.get(self._workers[0].rendezvous_address.remote(), timeout=timeout_s)
            self.reports: list[ShardReady] = self._wait_ready(
                [w.init.remote(address, timeout_s) for w in self._workers], timeout_s
            )
            if config.num_blocks == 0:  # on GPUs: sized from what the shards measured
                config = dataclasses.replace(config, num_blocks=kv_plan(config, [r.memory for r in self.reports]).num_blocks)
            self.kv_bytes: list[int] = ray.get([w.allocate.remote(config.num_blocks) for w in self._workers],
                                               timeout=timeout_s)  # fmt: skip
        except BaseException:
            self.shutdown()
            raise
        self.config = config
        """With the number of KV blocks decided (measured on GPUs)."""
        for r, kv in zip(self.reports, self.kv_bytes, strict=True):
            logger.info("shard (stage %d, tp_rank %d) on %s: %s %s, weights %.1f MiB, KV cache %.1f MiB (%d blocks)",
                        r.stage, r.tp_rank, r.node_id[:8], r.device, r.dtype, r.weight_bytes / 2**20, kv / 2**20,
                        config.num_blocks)  # fmt: skip
        self._last = (shape.pp - 1) * shape.tp  # the sampling shard: last stage, TP rank 0
        self.max_in_flight = shape.pp if max_in_flight is None else max_in_flight
        """Steps in flight at once: one micro-batch per pipeline stage by default."""

    def _wait_ready(self, refs: list, timeout_s: float) -> list[ShardReady]:
        """Every shard's report; a timeout names the shards still starting and where to look."""
        try:
            return ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            ready, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
            late = ", ".join(f"({self._shard(refs.index(r))})" for r in pending)
            raise TimeoutError(
                f"shards {late} of this {self.shape.tp} x {self.shape.pp} replica did not finish starting "
                f"(joining their process group, loading their weights, building the CPU kernels if missing) "
                f"within {timeout_s:g} s; see {ray_logs_hint()}"
            ) from None

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def worker_nodes(self) -> dict[tuple[int, int], str]:
        """(stage, tp_rank) -> hex id of the node the shard runs on."""
        return {(r.stage, r.tp_rank): r.node_id for r in self.reports}

    def worker_pids(self) -> dict[tuple[int, int], int]:
        return {(r.stage, r.tp_rank): r.pid for r in self.reports}

    def timings(self) -> dict[tuple[int, int], tuple[float, float]]:
        """(stage, tp_rank) -> (seconds executing steps, of which waiting on pipeline peers)."""
        results = ray.get([w.timings.remote() for w in self._workers], timeout=self.step_timeout_s)
        return {(r.stage, r.tp_rank): t for r, t in zip(self.reports, results, strict=True)}

    async def ping(self) -> None:
        """Every shard answers (from an event loop: awaited, not a blocking get); raises the first
        failure."""
        await asyncio.gather(*(w.health.remote() for w in self._workers))

    def inject_failure(self, stage: int, tp_rank: int, after_num_steps: int = 0) -> ray.ObjectRef:
        """Test-only: make one shard raise in a coming step (``ShardActor.inject_failure``).
        Returns the call's ref; the failure is armed once it resolves."""
        if not (0 <= stage < self.shape.pp and 0 <= tp_rank < self.shape.tp):
            raise ValueError(
                f"no shard (stage {stage}, tp_rank {tp_rank}) in a "
                f"tp={self.shape.tp} x pp={self.shape.pp} replica"
            )
        if not self._workers:
            raise RuntimeError("the executor is shut down")
        return self._workers[stage * self.shape.tp + tp_rank].inject_failure.remote(after_num_steps)

    def submit(self, delta: StepDelta) -> RayStep:
        """Start one step on every shard; several may be in flight (pipeline micro-batches:
        each shard runs its calls in submission order, so stage 0 starts the next
        micro-batch while stage 1 finishes this one)."""
        if not self._workers:
            raise RuntimeError("the executor is shut down")
        # NOTE: passed by value, not ``ray.put``: a delta is 0.1-3 KB, which Ray inlines in the
        # call (one per shard); a put goes through the object store and cost 4.5 ms a round
        # trip against 1.8 here (bench/README.md, "What crosses Ray per decode step").
        return RayStep(self, [w.execute.remote(delta) for w in self._workers])

    def execute(self, delta: StepDelta) -> StepOutput | torch.Tensor:
        """Run one step to the end: its ``StepOutput`` (the logits when ``delta.return_logits``)."""
        return self.submit(delta).result()

    def shutdown(self) -> None:
        """Leave the process groups, kill every shard, wait until their processes are gone (a
        GPU's memory is freed only then: a successor on it must not measure it as taken), and
        free the placement (idempotent)."""
        workers, self._workers = self._workers, []
        if workers:
            refs = [w.shutdown.remote() for w in workers]
            ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_GRACE_S)
            for w in workers:
                ray.kill(w, no_restart=True)
            _wait_dead(workers, EXIT_TIMEOUT_S)
        self.placement.remove()

    def _shard(self, rank: int) -> str:
        return f"stage {rank // self.shape.tp}, tp_rank {rank % self.shape.tp}"

    def _failure(self, rank: int, error: BaseException) -> RuntimeError:
        return RuntimeError(f"shard ({self._shard(rank)}) failed the step: {error}")

    def _timeout(self, refs: list, pending: list) -> TimeoutError:
        late = ", ".join(f"({self._shard(refs.index(r))})" for r in pending)
        return TimeoutError(
            f"a step did not finish within {self.step_timeout_s:g} s on shards {late} (their start-up, kernel "
            f"builds included, was already done); see {ray_logs_hint()}"
        )


def _wait_dead(actors: list, timeout_s: float) -> None:
    """Until Ray reports every actor dead (a call raises ``RayActorError``), or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    for actor in actors:
        while time.monotonic() < deadline:
            try:
                ray.get(actor.health.remote(), timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except GetTimeoutError:
                continue  # dying, or hung: ask again until the deadline
            except RayActorError:
                break
            time.sleep(0.05)


class RayStep:
    """A step in flight on every shard of a ``RayExecutor``."""

    def __init__(self, executor: RayExecutor, refs: list) -> None:
        self._executor, self._refs = executor, refs

    def result(self) -> StepOutput | torch.Tensor:
        """The sampling shard's answer; raises the first shard failure (after which the replica
        must be shut down: its peers may be stuck in a collective) or a timeout."""
        ex, refs = self._executor, self._refs
        results: dict = {}
        deadline = time.monotonic() + ex.step_timeout_s
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise ex._timeout(refs, pending)
            try:
                results[done[0]] = ray.get(done[0])
            except RayError as e:
                raise ex._failure(refs.index(done[0]), e) from e
        return results[refs[ex._last]]
