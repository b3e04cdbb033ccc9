"""A model replica: one Engine (scheduler, KV blocks, sampler) driving its Ray shard workers.

``Replica`` is a plain class; ``ReplicaActor = ray.remote(Replica)`` is the Ray actor. It
streams per-request deltas through Ray streaming generators and never blocks its event loop:
the engine steps on its own thread (``AsyncEngine``), and only the stepping thread waits on
the workers.

Failure: if any shard raises or dies during a step, the executor kills all of the replica's
shards (survivors may be stuck in a collective with the lost one), the engine ends every
running request's stream with a ``finish_reason="error"`` delta, fresh shards start in the
background, and the replica goes on serving: the next request waits for them and succeeds.
Waiting requests hold no KV blocks and are kept; they run on the fresh shards.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from kvtide.cluster.executor import RayExecutor
from kvtide.cluster.placement import ReplicaShape
from kvtide.cluster.publisher import ReplicaPublisher
from kvtide.proto.block_hash import HASH_VERSION
from kvtide.proto.kv_events import KvEvent
from kvtide.router.types import ReplicaLoad, ReplicaRegistration
from kvtide.workers.async_engine import AsyncEngine
from kvtide.workers.block_pool import KvSnapshot
from kvtide.workers.config import EngineConfig, resolve
from kvtide.workers.engine import Engine, EngineStats
from kvtide.workers.model_files import resolve_model
from kvtide.workers.model_loader import read_hf_config
from kvtide.workers.outputs import CompletionDelta
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.step_inputs import StepDelta
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
    """The engine's executor: the replica's Ray workers, replaced whole after a failure.

    A failed step kills every shard at once (survivors may be stuck in a collective with the
    lost one) and raises, so the engine fails its running requests without waiting; fresh
    shards start on a background thread, and the next step waits for them. If they cannot
    start, that step fails too and another start begins.

    NOTE: ``forward`` runs on the engine's stepping thread only; ``current`` and ``shutdown``
    may run on another thread, so the swap of workers is under ``_lock``.
    """

    device = torch.device("cpu")

    def __init__(self, start: Callable[[], RayExecutor]) -> None:
        self._start = start
        self._lock = threading.Lock()
        self._closed = False
        self._workers: RayExecutor | None = start()
        self._max_in_flight = self._workers.max_in_flight
        self._starting: Future[RayExecutor] | None = None
        self.num_restarts = 0
        """Completed restarts."""

    def current(self) -> RayExecutor:
        """The running shards; raises ``RuntimeError`` while they restart or after shutdown."""
        with self._lock:
            if self._workers is None:
                raise RuntimeError(
                    "the replica is shut down" if self._closed else "the replica's shards are restarting"
                )
            return self._workers

    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight

    def submit(self, delta: StepDelta) -> _WatchedStep:
        try:
            workers = self._ready_workers()
            return _WatchedStep(self, workers, workers.submit(delta))
        except Exception as exc:  # noqa: BLE001 - the step fails; the engine hears it from result()
            return _WatchedStep(self, None, None, exc)

    def _on_failure(self, workers: RayExecutor) -> None:
        with self._lock:
            current = workers is self._workers
        if current:  # the first failed step of several in flight restarts; the rest just fail
            logger.exception("a shard failed; restarting every shard of the replica")
            workers.shutdown()
            self._restart()

    def shutdown(self) -> None:
        """Kill the shards and free their placement (idempotent). A restart under way cleans
        up after itself when it finishes."""
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, None
        if workers is not None:
            workers.shutdown()

    def _ready_workers(self) -> RayExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("the replica is shut down")
            workers, starting = self._workers, self._starting
        if workers is not None:
            return workers
        assert starting is not None, "no workers and no restart under way"
        try:
            return starting.result()  # RayExecutor bounds its own start by start_timeout_s
        except Exception as exc:
            self._restart()
            raise RuntimeError(f"the replica's shards could not be restarted: {exc}") from exc

    def _restart(self) -> None:
        starting: Future[RayExecutor] = Future()
        with self._lock:
            if self._closed:
                return
            self._workers, self._starting = None, starting
        threading.Thread(
            target=self._start_into, args=(starting,), name="kvtide-replica-restart", daemon=True
        ).start()

    def _start_into(self, starting: Future[RayExecutor]) -> None:
        try:
            workers = self._start()
        except BaseException as exc:  # noqa: BLE001 - handed to the stepping thread
            starting.set_exception(exc)
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self._workers, self._starting = workers, None
                self.num_restarts += 1
        if closed:
            workers.shutdown()
            starting.set_exception(RuntimeError("the replica was shut down while its shards restarted"))
        else:
            starting.set_result(workers)


class _WatchedStep:
    """A step in flight on the current shards; its failure restarts them."""

    def __init__(self, owner: _RestartingExecutor, workers, step, error: BaseException | None = None) -> None:
        self._owner, self._workers, self._step, self._error = owner, workers, step, error

    def result(self) -> torch.Tensor:
        if self._error is not None:
            raise self._error
        try:
            return self._step.result()
        except Exception:
            self._owner._on_failure(self._workers)
            raise


class Replica:
    def __init__(
        self,
        model: str = "smollm2-135m",
        tp: int = 1,
        pp: int = 1,
        cpus_per_shard: float = 1.0,
        start_timeout_s: float = 300.0,
        placement_owner: str = "",
        **engine_options,
    ) -> None:
        """``placement_owner`` names the shards' placement groups (``placement.remove_groups``),
        so whoever started this replica can free them if it dies."""
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
                kv_cache_dtype=resolved.kv_cache_dtype,
                quantization=config.model.quantization,
                placement_owner=placement_owner,
            )
        )
        try:
            self.engine = Engine(resolved, self.executor, _tokenizer(model_dir))
            self._async = AsyncEngine(self.engine)
        except BaseException:
            self.executor.shutdown()
            raise

    def info(self) -> ReplicaInfo:
        cfg = self.engine.config
        nodes = self.executor.current().worker_nodes()
        return ReplicaInfo(self.shape.tp, self.shape.pp, cfg.num_blocks, cfg.block_size, nodes)

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

        try:
            return await asyncio.wait_for(probe(), timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"the probe step (1 token through the engine and every shard) did not finish within {timeout_s:g} s"
            ) from None

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def num_restarts(self) -> int:
        return self.executor.num_restarts

    def shard_pids(self) -> dict[tuple[int, int], int]:
        """(stage, tp_rank) -> process id of each running shard."""
        return self.executor.current().worker_pids()

    async def inject_shard_failure(self, stage: int, tp_rank: int, after_num_steps: int = 0) -> None:
        """Test-only: one shard raises in a coming step (``WorkerActor.inject_failure``)."""
        await self.executor.current().inject_failure(stage, tp_rank, after_num_steps)

    def shutdown(self) -> None:
        """Stop publishing, stop stepping, kill every shard and free their placement
        (idempotent)."""
        self.stop_publishing()
        self._async.shutdown()
        self.executor.shutdown()

    def abort(self, request_id: str) -> None:
        """Abort a request and all its choices; the engine frees its blocks before its next step.

        The frontend calls this beside ``ray.cancel`` on the request's stream: the cancel ends
        the Ray call, but the generator it closes only aborts once it is collected, and a
        request still waiting in the engine must never run.
        """
        self._async.abort(request_id)


    # -- cluster state: what the router learns about this replica ---------------------------

    def registration(self, replica_id: str, model: str | None = None) -> ReplicaRegistration:
        """What this replica registers under ``replica_id``; ``model`` defaults to the model
        directory's name. The incarnation is fixed per process, so a restarted replica under
        the same id is told apart (its event ids start again at 0)."""
        cfg = self.engine.config
        if not hasattr(self, "_incarnation"):
            self._incarnation = uuid.uuid4().hex
        return ReplicaRegistration(
            replica_id=replica_id,
            block_size=cfg.block_size,
            hash_seed=cfg.engine.cache.hash_seed.encode(),
            hash_version=HASH_VERSION,
            num_blocks=cfg.num_blocks,
            model=model or Path(cfg.model_dir).name,
            incarnation=self._incarnation,
        )

    def load(self) -> ReplicaLoad:
        s = self.engine.stats()
        return ReplicaLoad(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_free_blocks=s.num_free_blocks,
            num_total_blocks=self.engine.config.num_blocks,
            kv_cache_usage=s.kv_cache_usage,
            num_preemptions=s.num_preemptions,
        )

    def kv_snapshot(self) -> KvSnapshot:
        """(last_event_id, cached block hashes) for a router's resync; safe while stepping."""
        return self.engine.kv_snapshot()

    def take_kv_events(self) -> list[KvEvent]:
        """KV events since the last call, for a caller that feeds a router directly (tests,
        ``bench/routing.py``). Not together with ``start_publishing``: each event goes to one
        consumer."""
        return self.engine.drain_kv_events()

    def start_publishing(
        self,
        url: str,
        replica_id: str,
        model: str | None = None,
        interval_s: float = 0.1,
        ttl_s: float = 3.0,
    ) -> ReplicaRegistration:
        """Publish KV events, load and a heartbeat to the Redis at ``url`` every ``interval_s``
        (``kvtide.cluster.publisher``); the registry entry expires ``ttl_s`` after the last
        heartbeat. Returns the registration. Idempotent for the same url and id."""
        reg = self.registration(replica_id, model)
        current = getattr(self, "_publisher", None)
        if current is not None and current.running:
            if (current.url, current.registration) == (url, reg):
                return reg
            current.stop()
        self._publisher = ReplicaPublisher(
            url, reg, self.engine.drain_kv_events, self.load, interval_s=interval_s, ttl_s=ttl_s
        )
        self._publisher.start()
        return reg

    def stop_publishing(self) -> None:
        """Stop publishing and leave the registry (``shutdown`` does it too)."""
        publisher = getattr(self, "_publisher", None)
        if publisher is not None:
            publisher.stop()

    def publisher_stats(self) -> dict[str, int]:
        p = getattr(self, "_publisher", None)
        if p is None:
            return {}
        return {"published": p.num_published, "failed": p.num_failed, "events_dropped": p.num_events_dropped}

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache (an ``AllBlocksCleared`` event tells the router), for
        benchmarks that compare policies from a cold cache. Only while the replica is idle:
        returns False, changing nothing, while a request is queued or running."""
        if self.engine.has_unfinished_requests():
            return False
        return self.engine.kv.reset_prefix_cache()

def _tokenizer(model_dir: Path) -> Tokenizer | None:
    """None for a model without ``tokenizer.json``: it then serves token-id prompts only."""
    return Tokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").is_file() else None


ReplicaActor = ray.remote(Replica)
