"""The engine of one replica: Scheduler + KV cache manager + ModelRunner, stepped in a loop.

Token ids in, token ids out: the engine never sees text. Whoever has the text (the frontend's
gateway, the offline ``LLM``) tokenizes, detokenizes and checks stop strings, and aborts a
choice whose stop string it found (vLLM v1's split between engine core and output processor).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch


from kvtide.proto.kv_events import KvEvent
from kvtide.workers.block_pool import KvSnapshot
from kvtide.workers.config import EngineConfig, ResolvedConfig, kv_plan, resolve_engine
from kvtide.workers.engine_request import CHILD_SEPARATOR, EngineRequest, RequestLimits, check_request
from kvtide.workers.kv_cache_manager import KVCacheManager
from kvtide.workers.model_loader import load_model
from kvtide.workers.model_runner import Executor, LocalExecutor, ModelRunner, StepHandle
from kvtide.workers.models.llama import LlamaForCausalLM
from kvtide.workers.outputs import CompletionDelta
from kvtide.workers.request import Request, RequestId, RequestStatus
from kvtide.workers.sampler import SampledToken
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.scheduler import Scheduler, StepPlan
from kvtide.workers.shard import ShardRunner

logger = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_preemptions: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_pending_prefill_tokens: int = 0


class Engine:
    """Add requests, abort them, and ``step()``: each step returns the per-choice deltas.

    Not thread-safe: one thread drives it (``AsyncEngine`` wraps it for asyncio).
    """

    def __init__(self, config: ResolvedConfig, executor: Executor) -> None:
        self.config = config
        self.eos_token_ids = config.eos_token_ids
        self.vocab_size = config.vocab_size
        self.limits = RequestLimits(
            config.max_model_len, config.vocab_size, config.engine.scheduler.max_num_seqs,
            config.num_blocks, config.block_size,
        )  # fmt: skip
        cc = config.engine.cache
        self.kv = KVCacheManager(
            config.num_blocks,
            config.block_size,
            cc.enable_prefix_caching,
            hash_seed=cc.hash_seed.encode(),
        )
        self.scheduler = Scheduler(config.engine.scheduler, self.kv, _child_id)
        self.runner = ModelRunner(executor, config.block_size, self._seed_of)
        self._depth = max(1, getattr(executor, "max_in_flight", 1))
        self._in_flight: deque[tuple[StepPlan, StepHandle]] = deque()
        self._rng = random.Random(config.engine.seed)
        self._seeds: dict[RequestId, int] = {}
        """Each request's sampling seed (its own, or drawn from the engine's seed); the sampling
        shard seeds its generator with it."""
        self._prefix_queried = 0
        self._prefix_hits = 0
        self._pending_prefill = 0
        """``Scheduler.pending_prefill_tokens`` as of the last step, add or abort: counted on the
        stepping thread, read by ``stats()`` from any thread."""

    @classmethod
    def load(cls, model: str = "smollm2-135m", config: EngineConfig | None = None, **kwargs) -> Engine:
        """Build from a model name or path; ``kwargs`` are flat ``EngineConfig`` options."""
        config = config or EngineConfig.from_kwargs(model=model, **kwargs)
        resolved = resolve_engine(config)
        if resolved.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device is cuda (from {config.model.device!r}) but torch finds no CUDA device here")
        for note in resolved.check_device():
            logger.warning(note)
        net = load_model(
            resolved.model_dir, resolved.dtype, resolved.device, quantization=config.model.quantization
        )
        return cls.from_model(net, resolved)

    @classmethod
    def from_model(cls, model: LlamaForCausalLM, config: ResolvedConfig) -> Engine:
        """A single-shard engine around an already-built model. On a GPU without a given
        ``num_blocks``, the KV cache gets what the weights and a measured full step leave."""
        shard = ShardRunner(
            model, config.num_blocks or None, config.block_size, kv_dtype=config.kv_cache_dtype,
            attention_backend=config.attention_backend, eos_token_ids=config.eos_token_ids,
        )
        if not config.num_blocks:
            sched = config.engine.scheduler
            memory = shard.measure_memory(sched.max_num_batched_tokens, sched.max_num_seqs)
            config = dataclasses.replace(config, num_blocks=kv_plan(config, [memory]).num_blocks)
            shard.allocate_kv_cache(config.num_blocks)
        sched = config.engine.scheduler
        shard.warm_up(sched.max_num_batched_tokens, sched.max_num_seqs)
        logger.info(config.describe_kv_cache())
        return cls(config, LocalExecutor(shard))

    # -- requests ------------------------------------------------------------------------

    def add(self, request: EngineRequest) -> None:
        """Queue a request. One checked against this engine's limits is taken as is; any other
        is checked here first (the engine's guard): raises ``ValueError``, changing nothing."""
        if request.checked != self.limits:
            request = check_request(
                request.request_id, request.prompt_token_ids, request.params, self.limits, request.output_token_ids
            )
        if request.request_id in self.scheduler.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        r = Request(RequestId(request.request_id), list(request.prompt_token_ids), request.params,
                    output_token_ids=list(request.output_token_ids))  # fmt: skip
        self._pending_prefill += self.scheduler.add(r)
        seed = r.params.seed
        self._seeds[r.request_id] = seed if seed is not None else self._rng.randrange(2**63)

    def add_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams | None = None
    ) -> None:
        if isinstance(prompt_token_ids, str):
            raise ValueError("the engine takes token ids, not text; tokenize first (LLM does it for you)")
        self.add(check_request(request_id, prompt_token_ids, params or SamplingParams(), self.limits))

    def abort_request(self, request_id: str, index: int | None = None) -> list[int]:
        """Abort a request and all its choices, or only choice ``index``; their blocks are free
        when this returns. Returns the indices of the choices it ended (none if they had
        finished already)."""
        if index is None:
            ids = [rid for rid in self.scheduler.requests if _parent_of(rid) == request_id]
        else:
            ids = [rid for rid in (request_id if index == 0 else f"{request_id}{CHILD_SEPARATOR}{index}",)
                   if rid in self.scheduler.requests]  # fmt: skip
        aborted = self.scheduler.abort(ids)
        for request in aborted:
            self._forget(request)
        self._pending_prefill = self.scheduler.pending_prefill_tokens()
        return [r.index for r in aborted]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def take_kv_events(self) -> list[KvEvent]:
        """KV events (stored / removed / cleared) since the last call, for the router."""
        return self.kv.take_events()

    def kv_snapshot(self) -> KvSnapshot:
        """The prefix cache's block hashes for a router's resync; callable from any thread."""
        return self.kv.pool.snapshot()

    def drain_kv_events(self) -> list[KvEvent]:
        """``take_kv_events`` for a consumer on another thread than ``step()`` (a publisher)."""
        return self.kv.pool.drain_events()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.usage,
            num_free_blocks=self.kv.num_free_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queried_tokens=self._prefix_queried,
            prefix_cache_hit_tokens=self._prefix_hits,
            num_pending_prefill_tokens=self._pending_prefill,
        )

    # -- the loop --------------------------------------------------------------------------

    def step(self) -> list[CompletionDelta]:
        """Run the oldest step in flight to its end and return its deltas.

        With an executor that takes several steps at once (pipeline parallel: one micro-batch
        per stage), first fill the pipeline: each micro-batch gets its share of the
        unfinished requests, and a request in flight is not scheduled again (nor preempted)
        until its step is finished here.
        """
        depth = self._depth
        while len(self._in_flight) < depth:
            cap = None if depth == 1 else -(-self.scheduler.num_unfinished // depth)
            plan = self.scheduler.schedule(max_chunks=cap)
            if plan.empty:
                break
            self._count_prefix_queries(plan)
            try:
                self._in_flight.append((plan, self.runner.submit(plan)))
            except Exception as exc:  # e.g. shards gone: as if the step failed
                logger.exception("submitting a step failed; failing the running requests")
                return self._fail_running(str(exc))
        if not self._in_flight:
            return []
        plan, handle = self._in_flight.popleft()
        try:
            sampled = self.runner.finish(plan, handle)
        except Exception as exc:  # one bad batch must not take the engine down
            logger.exception("step failed; failing the %d running requests", len(self.scheduler.running))
            return self._fail_running(str(exc))
        self.scheduler.complete(plan)
        deltas = [self._on_token(request, token) for request, token in sampled]
        self._pending_prefill = self.scheduler.pending_prefill_tokens()
        return deltas

    def _count_prefix_queries(self, plan: StepPlan) -> None:
        for chunk in plan.chunks:
            r = chunk.request
            if chunk.start == r.num_cached_prompt_tokens and r.num_preemptions == 0 and r.num_output_tokens == 0:
                self._prefix_queried += r.num_prompt_tokens
                self._prefix_hits += r.num_cached_prompt_tokens

    def _fail_running(self, detail: str) -> list[CompletionDelta]:
        """After a failed step the KV cache is suspect: blocks registered for this step's
        tokens hold garbage, and a lost shard loses every block. So every running request
        fails and the prefix cache is dropped; waiting requests hold no blocks and are
        computed from scratch later."""
        self._in_flight.clear()  # the same failure ends them: their shards are gone or suspect
        deltas = [
            self._finish(r, RequestStatus.FINISHED_ERROR, (), detail=detail)
            for r in list(self.scheduler.running)
        ]
        self.runner.reset()
        cleared = self.kv.reset_prefix_cache()
        assert cleared, "no block may be in use once every running request has finished"
        self._pending_prefill = self.scheduler.pending_prefill_tokens()
        return deltas

    def _on_token(self, request: Request, token: SampledToken) -> CompletionDelta:
        t = token.token_id
        request.append_output_token(t)
        p = request.params
        logprobs = (token,) if p.logprobs is not None else ()
        status, stop_reason = None, None
        if request.num_output_tokens >= p.min_tokens and (
            (t in self.eos_token_ids and not p.ignore_eos) or t in p.stop_token_ids
        ):
            status = RequestStatus.FINISHED_STOPPED
            stop_reason = t if t in p.stop_token_ids else None
        elif request.num_output_tokens >= p.max_tokens or request.num_tokens >= self.config.max_model_len:
            status = RequestStatus.FINISHED_LENGTH
        if status is None:
            return self._delta(request, (t,), logprobs)
        return self._finish(request, status, (t,), logprobs, stop_reason)

    def _finish(self, request, status, token_ids, logprobs=(), stop_reason=None, detail=None):
        self.scheduler.finish(request, status)
        self._forget(request)
        return self._delta(request, token_ids, logprobs, status.value, stop_reason, detail)

    def _delta(self, request, token_ids, logprobs, finish_reason=None, stop_reason=None, error=None):
        return CompletionDelta(
            request_id=request.parent_id or request.request_id,
            index=request.index,
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            error=error,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_prompt_tokens,
        )

    def _forget(self, request: Request) -> None:
        self.runner.forget(request.request_id)
        self._seeds.pop(request.request_id, None)

    def _seed_of(self, request: Request) -> int:
        seed = self._seeds.get(request.request_id)
        if seed is None:
            # A child forked this step, sampled in the same step as its parent (still alive);
            # choice i of a seeded request is seeded with seed + i.
            seed = self._seeds[request.request_id] = self._seeds[request.parent_id] + request.index
        return seed


def _child_id(parent: Request, index: int) -> RequestId:
    return RequestId(f"{parent.request_id}{CHILD_SEPARATOR}{index}")


def _parent_of(rid: str) -> str:
    return rid.split(CHILD_SEPARATOR, 1)[0]
