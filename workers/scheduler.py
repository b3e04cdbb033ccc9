"""Continuous batching with chunked prefill and preemption by recompute.

Each ``schedule()`` fills one step under a token budget: first the running requests (one
decode token each, or the next chunk of an unfinished prefill), then waiting requests in
queue order, whose prompts may be split into chunks across steps. The queue is ordered by
arrival time plus ``queue_order_s_per_token`` for each prompt token still to compute: of
requests that arrive together the shortest prefills start first (more first tokens sooner),
and a request is passed only by ones arriving within its own slack. When the KV cache runs
out, the most recently admitted running request is preempted: its blocks are freed and it
goes back to the front of the queue to be recomputed (its prefix-cached blocks usually
survive, so recompute is cheap). The oldest running request always makes progress, and a
request that could never fit is rejected at ``add``, so the loop cannot deadlock.

With several steps in flight (pipeline micro-batches) a request in flight is neither
scheduled nor preempted. When the only request that could be preempted is the one asking
for blocks and newer requests hold blocks mid-step, it waits for them instead of preempting
itself: otherwise two requests could take turns preempting each other forever.

Pure Python: the scheduler touches requests and block tables, never tensors.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from kvtide.workers.config import SchedulerConfig
from kvtide.workers.kv_cache_manager import KVCacheManager
from kvtide.workers.request import Request, RequestId, RequestStatus


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """``num_new_tokens`` tokens of ``request`` computed this step, from position ``start``."""

    request: Request
    start: int
    num_new_tokens: int
    sample: bool
    """True when this chunk reaches the request's last known token, so a token is sampled."""
    forks: tuple[Request, ...] = ()
    """Children forked from ``request`` this step (n > 1); each samples from the same logits."""


@dataclass(frozen=True, slots=True)
class StepPlan:
    chunks: tuple[ScheduledChunk, ...]
    """Decode chunks (one token) first, then prefill chunks."""
    num_batched_tokens: int
    block_copies: tuple[tuple[int, int], ...]
    """(src, dst) KV blocks to copy before the step (copy-on-write of shared partial blocks)."""
    preempted: tuple[Request, ...]

    @property
    def empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, fork_child_id) -> None:
        """``fork_child_id(parent, index) -> RequestId`` names the children of an n > 1 request."""
        self.config = config
        self.kv = kv
        self._fork_child_id = fork_child_id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[RequestId, Request] = {}
        self.num_preemptions = 0

    # -- queue changes -------------------------------------------------------------------

    def add(self, request: Request) -> int:
        """Queue a validated request (the engine checks it can ever fit) in its place by
        ``queue_key``; returns the tokens it must prefill (``pending_prefill_tokens``)."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        pending = self.pending_prefill_tokens([request])
        request.queue_key = request.arrival_time + pending * self.config.queue_order_s_per_token
        self.requests[request.request_id] = request
        # Preempted requests (key -inf) stay at the front; the rest are sorted by key.
        bisect.insort_right(self.waiting, request, key=_queue_key)
        return pending

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request (stopped, length, aborted, error) and free its blocks now."""
        assert status.finished
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif not request.is_finished:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
        self.requests.pop(request.request_id, None)

    def abort(self, request_ids: Iterable[RequestId]) -> list[Request]:
        """Abort requests by id; unknown ids are ignored. Their blocks are free on return."""
        aborted = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is not None:
                self.finish(request, RequestStatus.FINISHED_ABORTED)
                aborted.append(request)
        return aborted

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def pending_prefill_tokens(self, requests: Iterable[Request] | None = None) -> int:
        """Tokens the waiting and running requests (or ``requests``) must still prefill before
        they decode, a waiting one's prefix-cache hits deducted: what stands between a new
        request and its first token here, for the router. On the stepping thread only (it
        hashes waiting requests' blocks)."""
        pending = 0
        for r in itertools.chain(self.waiting, self.running) if requests is None else requests:
            done = r.num_computed_tokens
            if r.status is RequestStatus.WAITING:
                done = max(done, self.kv.get_computed_blocks(r).num_computed_tokens)
            left = r.num_tokens - done
            if left > 1 or not r.output_token_ids:  # 1 left after an output token is a decode
                pending += left
        return pending

    # -- one step --------------------------------------------------------------------------

    def schedule(self, max_chunks: int | None = None) -> StepPlan:
        """Plan one step. ``max_chunks`` caps the requests in it (one micro-batch's share when
        several steps are in flight); requests still in flight are skipped."""
        budget = self.config.max_num_batched_tokens
        room = max_chunks if max_chunks is not None else len(self.running) + len(self.waiting)
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        copies: list[tuple[int, int]] = []
        preempted: list[Request] = []
        forked: list[Request] = []
        deferred = False

        i = 0
        while i < len(self.running) and budget > 0 and room > 0:
            request = self.running[i]
            if request.in_flight:
                i += 1
                continue
            num_new = self._chunk_size(request.num_tokens - request.num_computed_tokens, budget)
            while True:
                pairs = self.kv.allocate_slots(request, num_new)
                if pairs is not None:
                    break
                victim = next(r for r in reversed(self.running) if not r.in_flight)
                if victim is request and any(r.in_flight for r in self.running[i + 1 :]):
                    # Newer requests hold the blocks but are mid-step: wait for them rather
                    # than preempt an older one (the oldest must keep making progress).
                    deferred = True
                    break
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if pairs is None:  # preempted itself or waits; nothing after it runs either
                break
            copies.extend(pairs)
            chunk = self._advance(request, num_new)
            forked.extend(chunk.forks)
            (decodes if num_new == 1 else prefills).append(chunk)
            budget -= num_new
            room -= 1
            i += 1

        while self.waiting and budget > 0 and room > 0 and not preempted and not deferred:
            request = self.waiting[0]
            seats = sum(_seats(r) for r in self.running) + len(forked)
            if seats + _seats(request) > self.config.max_num_seqs:
                break
            computed = self.kv.get_computed_blocks(request)
            remaining = request.num_tokens - computed.num_computed_tokens
            num_new = self._chunk_size(remaining, budget)
            pairs = self.kv.allocate_slots(request, num_new, computed)
            if pairs is None:
                break
            copies.extend(pairs)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunk = self._advance(request, num_new)
            forked.extend(chunk.forks)
            (decodes if num_new == 1 else prefills).append(chunk)
            budget -= num_new
            room -= 1

        # Children join the running list only now, so none is scheduled in the step that forks it.
        self.running.extend(forked)
        chunks = tuple(decodes + prefills)
        return StepPlan(
            chunks=chunks,
            num_batched_tokens=sum(c.num_new_tokens for c in chunks),
            block_copies=tuple(copies),
            preempted=tuple(preempted),
        )

    def complete(self, plan: StepPlan) -> None:
        """The plan's step has finished: its requests may be scheduled again."""
        for chunk in plan.chunks:
            chunk.request.in_flight = False
            for child in chunk.forks:
                child.in_flight = False

    def _chunk_size(self, remaining: int, budget: int) -> int:
        cap = self.config.max_prefill_chunk
        return min(remaining, budget, cap if cap is not None and remaining > 1 else remaining)

    def _advance(self, request: Request, num_new: int) -> ScheduledChunk:
        request.in_flight = True
        start = request.num_computed_tokens
        request.num_computed_tokens += num_new
        sample = request.num_computed_tokens == request.num_tokens
        forks: tuple[Request, ...] = ()
        if sample and _seats(request) > 1:
            forks = self._fork(request)
        return ScheduledChunk(request, start, num_new, sample, forks)

    def _fork(self, parent: Request) -> tuple[Request, ...]:
        """Children share every block of the parent's prompt (copy-on-write later); the
        caller adds them to the running list after this step's scheduling."""
        parent.forked = True
        children = []
        for index in range(1, parent.params.n):
            child = Request(
                request_id=self._fork_child_id(parent, index),
                prompt_token_ids=parent.prompt_token_ids,
                params=parent.params,
                arrival_time=parent.arrival_time,
                parent_id=parent.request_id,
                index=index,
                status=RequestStatus.RUNNING,
                in_flight=True,
                num_cached_prompt_tokens=parent.num_cached_prompt_tokens,
            )
            self.kv.fork(parent, child)
            self.requests[child.request_id] = child
            children.append(child)
        return tuple(children)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.queue_key = -math.inf
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)


def _queue_key(request: Request) -> float:
    return request.queue_key


def _seats(request: Request) -> int:
    """Batch slots a request takes: all n choices for one not yet forked."""
    return 1 if request.forked or request.parent_id is not None else request.params.n
