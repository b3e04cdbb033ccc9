"""A model replica: one Engine (scheduler, KV blocks, sampler) driving its Ray shard actors.

``Replica`` is a plain class; ``ReplicaActor = ray.remote(Replica)`` is the Ray actor. It takes
requests of token ids (``EngineRequest``) and streams per-choice deltas of token ids back
through Ray streaming generators; it has no tokenizer. It never blocks its event loop: its
shards start on a thread, the engine steps on its own thread (``AsyncEngine``), and only the
stepping thread waits on the shards.

Failure: if any shard raises or dies during a step, the executor kills all of the replica's
shards (survivors may be stuck in a collective with the lost one), the engine ends every
running request's stream with a ``finish_reason="error"`` delta, fresh shards start in the
background, and the replica goes on serving: the next request waits for them and succeeds.
Waiting requests hold no KV blocks and are kept; they run on the fresh shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import ray

from kvtide.cluster.replica.executor import RayExecutor
from kvtide.cluster.replica.placement import ReplicaShape
from kvtide.cluster.replica.reporting import Reporting
from kvtide.cluster.replica.restarts import RestartingExecutor
from kvtide.cluster.replica.spec import ReplicaSpec
from kvtide.cluster.state.health import ReplicaHealth, ReplicaState
from kvtide.workers import AsyncEngine, CompletionDelta, Engine, EngineRequest, EngineStats, SamplingParams

logger = logging.getLogger(__name__)

PROBE_PROMPT = (1, 2, 3)
HUNG_STEP_S = 120.0
"""A step (or an engine loop) stuck this long makes the replica unhealthy."""


class Replica(Reporting):
    def __init__(self, spec: ReplicaSpec) -> None:
        _log_to_stderr()
        self.spec = spec
        self.shape = ReplicaShape(spec.tp, spec.pp, spec.config.device.type == "cuda", spec.cpus_per_shard)
        self._config = spec.config
        """The resolved config, with the KV block count the first start decided (measured on GPUs)."""
        self.executor = RestartingExecutor(self._start_shards, max_in_flight=spec.pp)
        self.engine: Engine | None = None
        """Made once the shards have started: its KV cache size is theirs."""
        self._async: AsyncEngine | None = None
        self._probes = 0

    def _start_shards(self, on_waiting) -> RayExecutor:
        """On the executor's start thread: every start after the first keeps the first's blocks."""
        shards = RayExecutor(
            self._config, self.shape, timeout_s=self.spec.start_timeout_s, placement_owner=self.spec.placement_owner,
            on_waiting=on_waiting,
        )  # fmt: skip
        self._config = shards.config
        return shards

    async def _ready(self) -> AsyncEngine:
        """The engine, once the shards have started (bounded; raises why they could not)."""
        if self._async is None:
            started = asyncio.wrap_future(self.executor.started)
            await asyncio.wait_for(started, self.spec.start_timeout_s + 30.0)
            if self._async is None:
                self.engine = Engine(self._config, self.executor)
                self._async = AsyncEngine(self.engine)
        return self._async

    def _engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("the replica is still starting its shards")
        return self.engine

    async def generate(self, request: EngineRequest) -> AsyncIterator[CompletionDelta]:
        """Call with ``.options(num_returns="streaming")``: one Ray object per delta. A request
        not checked against this replica's limits is checked first (``ValueError``)."""
        async for delta in (await self._ready()).generate(request):
            yield delta

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Abort a request and all its choices (or only choice ``index``); the engine frees its
        blocks before its next step.

        The frontend calls this beside ``ray.cancel`` on the request's stream: the cancel ends
        the Ray call, but the generator it closes only aborts once it is collected, and a
        request still waiting in the engine must never run. It also calls it for one choice
        whose stop string it found.
        """
        if self._async is not None:
            self._async.abort(request_id, index)

    async def health(self, timeout_s: float = 60.0) -> bool:
        """Waits for the shards' start (bounded by ``spec.start_timeout_s``; raises why it
        failed), then runs one real step: a 1-token greedy request through every shard."""
        engine = await self._ready()
        self._probes += 1
        request = EngineRequest(f"probe-{self._probes}", PROBE_PROMPT, SamplingParams(temperature=0.0, max_tokens=1))

        async def probe() -> bool:
            deltas = [d async for d in engine.generate(request)]
            return bool(deltas) and deltas[-1].finish_reason in ("length", "stop")

        try:
            return await asyncio.wait_for(probe(), timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"the probe step (1 token through the engine and every shard) did not finish within {timeout_s:g} s"
            ) from None

    async def check_health(self, timeout_s: float = 20.0) -> ReplicaHealth:
        """Fit to take requests now? Serving, the engine's loop going round and no step hung past
        ``HUNG_STEP_S``. A replica that is stepping has live shards (each step goes through all
        of them); an idle one pings its shards (``timeout_s``): one found dead gets its shards
        replaced (restarted with backoff, the crash-loop breaker stopping a replica that keeps
        failing), one that does not answer in time makes the replica unfit until it does."""
        ex = self.executor
        state, restarts = ex.state, ex.num_restarts
        if state is not ReplicaState.SERVING:
            reason = ex.broken_reason if state is ReplicaState.BROKEN else f"the replica is {state.value}"
            return ReplicaHealth(state, False, reason, restarts)
        engine = self._async
        if engine is not None:
            if not engine.alive:
                return ReplicaHealth(state, False, "its engine thread died", restarts)
            tick_age_s, step_age_s = engine.loop_ages_s()
            if step_age_s is not None:
                if step_age_s > HUNG_STEP_S:
                    return ReplicaHealth(state, False, f"a step has run for {step_age_s:.0f} s", restarts)
                return ReplicaHealth(state, True, "", restarts)  # stepping: its shards answer
            if tick_age_s > HUNG_STEP_S:
                return ReplicaHealth(state, False, f"its engine loop stopped {tick_age_s:.0f} s ago", restarts)
        try:
            await asyncio.wait_for(ex.current().ping(), timeout_s)
        except RuntimeError as exc:  # restarting meanwhile
            return ReplicaHealth(ex.state, False, str(exc), restarts)
        except ray.exceptions.RayActorError as exc:  # a shard died while the replica was idle
            ex.restart(f"a shard died while the replica was idle ({type(exc).__name__}: {exc})")
            return ReplicaHealth(ex.state, False, f"a shard died: {exc}", restarts)
        except Exception as exc:  # noqa: BLE001 - no answer in time
            return ReplicaHealth(state, False, f"a shard did not answer within {timeout_s:g} s: {exc!r}", restarts)
        return ReplicaHealth(state, True, "", restarts)

    def stats(self) -> EngineStats:
        return self._engine().stats()

    def shard_reports(self) -> list:
        """What each running shard reported at start: device, dtype, weight bytes, memory."""
        return list(self.executor.current().reports)

    def num_restarts(self) -> int:
        return self.executor.num_restarts

    def shard_nodes(self) -> dict[tuple[int, int], str]:
        """(stage, tp_rank) -> Ray node id of each running shard."""
        return self.executor.current().worker_nodes()

    def shard_pids(self) -> dict[tuple[int, int], int]:
        """(stage, tp_rank) -> process id of each running shard."""
        return self.executor.current().worker_pids()

    async def inject_shard_failure(self, stage: int, tp_rank: int, after_num_steps: int = 0) -> None:
        """Test-only: one shard raises in a coming step (``ShardActor.inject_failure``)."""
        await self.executor.current().inject_failure(stage, tp_rank, after_num_steps)

    async def shutdown(self) -> None:
        """Stop publishing, stop stepping, kill every shard and free their placement
        (idempotent). The blocking parts run on a thread: never a blocking Ray call in this
        actor's event loop."""
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self.stop_publishing()
        if self._async is not None:
            self._async.shutdown()
        self.executor.shutdown()


def _log_to_stderr() -> None:
    """Ray forwards a worker's stderr to the driver: show this process's INFO lines there."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


ReplicaActor = ray.remote(Replica)


async def stop_replica(actor) -> None:
    """Leave the registry, stop stepping and free the shards; then kill the actor. Never raises:
    whatever fails here, the rest of the caller's shutdown (Redis, Ray) still runs."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(actor.stop_publishing.remote(), 10.0)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(actor.shutdown.remote(), 30.0)
    with contextlib.suppress(Exception):
        ray.kill(actor)
