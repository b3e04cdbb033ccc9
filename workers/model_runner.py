"""Turns each ``StepPlan`` into a step delta and runs it on an executor, whose sampling shard
samples: what comes back is a token id (and the logprobs asked for) per sampled row."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from kvtide.workers.request import Request
from kvtide.workers.sampler import SampledToken
from kvtide.workers.scheduler import ScheduledChunk, StepPlan
from kvtide.workers.shard import ShardRunner
from kvtide.workers.step_inputs import (
    DeltaTracker,
    ForkSpec,
    SamplingSpec,
    StepDelta,
    StepInputs,
    StepOutput,
    pack_batch,
)


class StepHandle(Protocol):
    def result(self) -> StepOutput:
        """The step's sampled tokens, one per sampled row in plan order (a forking chunk's
        children after it); raises the step's failure."""
        ...


class Executor(Protocol):
    """Runs steps on every shard of a replica: ``LocalExecutor`` in-process, or Ray workers."""

    max_in_flight: int
    """Steps that may be submitted before the oldest is finished: 1, or the pipeline depth so
    that pipeline stages work on different micro-batches at once."""

    def submit(self, delta: StepDelta) -> StepHandle:
        """Start one step. Deltas reach every shard in submission order."""
        ...


class _Done:
    def __init__(self, output: StepOutput | None = None, error: BaseException | None = None) -> None:
        self._output, self._error = output, error

    def result(self) -> StepOutput:
        if self._error is not None:
            raise self._error
        return self._output


class LocalExecutor:
    """One shard holding the whole model in this process; each step runs at submit."""

    max_in_flight = 1

    def __init__(self, shard: ShardRunner) -> None:
        self.shard = shard

    @property
    def model(self):
        return self.shard.model

    def submit(self, delta: StepDelta) -> StepHandle:
        try:
            return _Done(self.shard.execute(delta))
        except Exception as exc:  # noqa: BLE001 - surfaces from result(), like a remote step
            return _Done(error=exc)


class ModelRunner:
    """Driver side of a replica: turns plans into step deltas and runs them."""

    def __init__(self, executor: Executor, block_size: int, seed_of: Callable[[Request], int]) -> None:
        """``seed_of`` gives each request's (or forked choice's) sampling seed."""
        self.executor = executor
        self.block_size = block_size
        self._seed_of = seed_of
        self.tracker = DeltaTracker()

    def submit(self, plan: StepPlan) -> StepHandle:
        return self.executor.submit(plan_delta(self.tracker, plan, self._seed_of))

    def finish(self, plan: StepPlan, handle: StepHandle) -> list[tuple[Request, SampledToken]]:
        """Wait for a submitted step; returns the sampled token of every sampling request
        (forks included) that is still running."""
        output = handle.result()
        requests = [r for c in plan.chunks if c.sample for r in (c.request, *c.forks)]
        assert len(output.tokens) == len(requests), (len(output.tokens), len(requests))
        # A request aborted while its step was in flight: its token is dropped.
        return [(r, t) for r, t in zip(requests, output.tokens, strict=True) if not r.is_finished]

    def execute(self, plan: StepPlan) -> list[tuple[Request, SampledToken]]:
        """Run one step to the end."""
        return self.finish(plan, self.submit(plan))

    def forget(self, request_id: str) -> None:
        self.tracker.forget(request_id)

    def reset(self) -> None:
        """After a failed step: the shards may have restarted empty."""
        self.tracker.reset()


def plan_delta(tracker: DeltaTracker, plan: StepPlan, seed_of: Callable[[Request], int] = lambda r: 0) -> StepDelta:
    """The delta that brings the shards from the previous plan (through ``tracker``) to ``plan``."""
    chunks = []
    for c in plan.chunks:
        r = c.request
        spec = None if tracker.knows(r.request_id) else SamplingSpec(r.params, seed_of(r), tuple(r.prompt_token_ids))
        forks = tuple(ForkSpec(f.request_id, seed_of(f)) for f in c.forks)
        chunks.append(tracker.chunk(r.request_id, c.start, _chunk_tokens(c), c.sample, r.block_ids, spec, forks))
    return tracker.delta(chunks, plan.block_copies)


def _chunk_tokens(c: ScheduledChunk) -> list[int]:
    r, start, end = c.request, c.start, c.start + c.num_new_tokens
    if c.num_new_tokens == 1 and r.output_token_ids and start == r.num_tokens - 1:
        return [r.output_token_ids[-1]]  # a decode: skip building all_token_ids
    return r.all_token_ids[start:end]


def prepare_inputs(plan: StepPlan, block_size: int, device: torch.device) -> StepInputs:
    """Pack a plan's chunks into one flat batch directly from the requests (no delta): what
    a shard's ``BatchState`` must reproduce from the deltas."""
    rows = [(_chunk_tokens(c), c.start, c.request.block_ids, c.sample) for c in plan.chunks]
    return pack_batch(rows, plan.block_copies, block_size, device)
