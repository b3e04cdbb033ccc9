"""Turns each ``StepPlan`` into a step delta, runs it on an executor, and samples."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from kvtide.workers.request import Request
from kvtide.workers.sampler import SampledToken, Sampler, SamplingRow
from kvtide.workers.scheduler import ScheduledChunk, StepPlan
from kvtide.workers.shard import ShardRunner
from kvtide.workers.step_inputs import (
    BatchState,
    DeltaTracker,
    StepDelta,
    StepInputs,
    pack_batch,
)


class StepHandle(Protocol):
    def result(self) -> torch.Tensor:
        """Logits [num_sampled_seqs, vocab_size] for the step's sampling chunks, in order;
        raises the step's failure."""
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
    def __init__(self, logits: torch.Tensor | None = None, error: BaseException | None = None) -> None:
        self._logits, self._error = logits, error

    def result(self) -> torch.Tensor:
        if self._error is not None:
            raise self._error
        return self._logits


class LocalExecutor:
    """One shard holding the whole model in this process; each step runs at submit."""

    max_in_flight = 1

    def __init__(self, shard: ShardRunner, block_size: int) -> None:
        self.shard = shard
        self.state = BatchState(block_size, shard.device)

    @property
    def model(self):
        return self.shard.model

    def submit(self, delta: StepDelta) -> StepHandle:
        try:
            return _Done(self.shard.forward(self.state.apply(delta)))
        except Exception as exc:  # noqa: BLE001 - surfaces from result(), like a remote step
            return _Done(error=exc)


class ModelRunner:
    """Driver side of a replica: turns plans into step deltas, runs them, samples."""

    def __init__(
        self,
        executor: Executor,
        block_size: int,
        sampling_row: Callable[[Request], SamplingRow],
    ) -> None:
        self.executor = executor
        self.block_size = block_size
        self._sampling_row = sampling_row
        self.sampler = Sampler()
        self.tracker = DeltaTracker()

    def submit(self, plan: StepPlan) -> StepHandle:
        return self.executor.submit(plan_delta(self.tracker, plan))

    @torch.inference_mode()
    def finish(self, plan: StepPlan, handle: StepHandle) -> list[tuple[Request, SampledToken]]:
        """Wait for a submitted step; returns the sampled token of every sampling request
        (forks included)."""
        logits = handle.result()
        sampling = [c for c in plan.chunks if c.sample]
        if not sampling:
            return []
        # A request forked this step and its children sample from the same logits row.
        repeats = [1 + len(c.forks) for c in sampling]
        if any(r > 1 for r in repeats):
            logits = logits.repeat_interleave(torch.tensor(repeats, device=logits.device), dim=0)
        requests = [r for c in sampling for r in (c.request, *c.forks)]
        live = [i for i, r in enumerate(requests) if not r.is_finished]
        if len(live) < len(requests):  # aborted while its step was in flight
            logits, requests = logits[live], [requests[i] for i in live]
            if not requests:
                return []
        sampled = self.sampler(logits, [self._sampling_row(r) for r in requests])
        return list(zip(requests, sampled, strict=True))

    def execute(self, plan: StepPlan) -> list[tuple[Request, SampledToken]]:
        """Run one step to the end."""
        return self.finish(plan, self.submit(plan))

    def forget(self, request_id: str) -> None:
        self.tracker.forget(request_id)

    def reset(self) -> None:
        """After a failed step: the shards may have restarted empty."""
        self.tracker.reset()


def plan_delta(tracker: DeltaTracker, plan: StepPlan) -> StepDelta:
    """The delta that brings the shards from the previous plan (through ``tracker``) to ``plan``."""
    chunks = [
        tracker.chunk(c.request.request_id, c.start, _chunk_tokens(c), c.sample, c.request.block_ids)
        for c in plan.chunks
    ]
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
