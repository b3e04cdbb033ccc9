"""Random workloads through the scheduler with a simulated model.

Small caches force preemption, small budgets force chunked prefill, prompts over a 3-token
alphabet share prefixes, and requests arrive and are aborted at random steps. Every step
must respect the budget and the batch cap; every request must end with exactly
``max_tokens`` outputs unless aborted, within a step bound, leaving every block free.

The step bound: whoever is first in the running list is never preempted (only a request
that could not fit alone would preempt itself, and ``add`` rejects those in the engine), and
the budget is at least 1, so it gains a token each step; it finishes within
``prompt + max_tokens`` steps of getting there. So all requests finish within
``last arrival + sum(prompt + max_tokens) + 1`` steps (times n for n > 1 requests, whose
choices each need their own tokens).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvtide.workers.config import SchedulerConfig
from kvtide.workers.kv_cache_manager import KVCacheManager
from kvtide.workers.request import Request, RequestId, RequestStatus
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.scheduler import Scheduler, StepPlan


@dataclass(frozen=True)
class Arrival:
    rid: str
    prompt: tuple[int, ...]
    max_tokens: int
    n: int
    arrive_step: int
    abort_step: int | None


@dataclass(frozen=True)
class Workload:
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_prefill_chunk: int | None
    enable_prefix_caching: bool
    arrivals: tuple[Arrival, ...]
    queue_order_s_per_token: float = 0.0


@st.composite
def workloads(draw, max_n: int = 1) -> Workload:
    block_size = draw(st.sampled_from([1, 2, 4]))
    num_blocks = draw(st.integers(2, 8))
    capacity = block_size * num_blocks
    arrivals = []
    for i in range(draw(st.integers(2, 6))):
        # The engine rejects requests whose prompt + max_tokens cannot fit the whole cache.
        # Each request may use up to the whole cache, and 3/4 of it at least, so they collide.
        total = draw(st.integers(max(2, capacity * 3 // 4), min(capacity, 24)))
        prompt = draw(st.lists(st.integers(0, 2), min_size=1, max_size=total - 1))
        room = total - len(prompt)
        arrivals.append(
            Arrival(
                rid=f"r{i}",
                prompt=tuple(prompt),
                # Long outputs grow running requests, which is what forces preemption.
                max_tokens=draw(st.integers(max(1, room * 3 // 4), room)),
                n=draw(st.integers(1, max_n)),
                arrive_step=draw(st.integers(0, 2)),
                abort_step=draw(st.integers(0, 30)) if draw(st.integers(0, 3)) == 0 else None,
            )
        )
    return Workload(
        block_size=block_size,
        num_blocks=num_blocks,
        max_num_seqs=draw(st.integers(max(2, max_n), 4)),
        max_num_batched_tokens=draw(st.integers(1, 16)),
        max_prefill_chunk=draw(st.none() | st.integers(1, 8)),
        enable_prefix_caching=draw(st.booleans()),
        arrivals=tuple(arrivals),
        queue_order_s_per_token=draw(st.sampled_from([0.0, 0.001, 1.0])),
    )


def simulate(w: Workload, depth: int = 1) -> None:
    """``depth`` steps may be in flight at once (pipeline micro-batches): a plan's requests
    get their tokens only when it completes, ``depth`` schedules later."""
    config = SchedulerConfig(w.max_num_seqs, w.max_num_batched_tokens, w.max_prefill_chunk, w.queue_order_s_per_token)
    kv = KVCacheManager(w.num_blocks, w.block_size, w.enable_prefix_caching)
    s = Scheduler(config, kv, fork_child_id=lambda parent, i: RequestId(f"{parent.request_id}#{i}"))
    pool = kv.pool
    by_id: dict[str, Request] = {}
    aborted: set[str] = set()
    pending = sorted(w.arrivals, key=lambda a: a.arrive_step)
    bound = max(a.arrive_step for a in w.arrivals) + sum(
        a.n * (len(a.prompt) + a.max_tokens) for a in w.arrivals
    ) + 1
    bound *= depth + 1  # a step now either plans a micro-batch or completes one
    in_flight: deque[StepPlan] = deque()

    step = 0
    while pending or s.num_unfinished or in_flight:
        assert step <= bound, f"no termination after {step} steps (bound {bound})"
        while pending and pending[0].arrive_step <= step:
            a = pending.pop(0)
            by_id[a.rid] = Request(
                RequestId(a.rid), list(a.prompt), SamplingParams(n=a.n, max_tokens=a.max_tokens)
            )
            s.add(by_id[a.rid])
        for a in w.arrivals:
            if a.abort_step == step and a.rid in by_id:
                ids = [rid for rid in s.requests if rid.split("#")[0] == a.rid]
                for r in s.abort(RequestId(rid) for rid in ids):
                    assert r.status is RequestStatus.FINISHED_ABORTED and not r.block_ids
                    aborted.add(r.request_id)

        computed_before = {r.request_id: r.num_computed_tokens for r in s.running}
        plan = s.schedule(max_chunks=None if depth == 1 else -(-s.num_unfinished // depth))
        if s.num_unfinished and not in_flight:
            assert not plan.empty, "requests wait but nothing was scheduled"
        busy = {r.request_id for p in in_flight for c in p.chunks for r in (c.request, *c.forks)}
        assert not busy & {c.request.request_id for c in plan.chunks}, "scheduled twice in flight"
        assert not busy & {r.request_id for r in plan.preempted}, "preempted while in flight"

        sizes = [c.num_new_tokens for c in plan.chunks]
        assert plan.num_batched_tokens == sum(sizes) <= w.max_num_batched_tokens
        assert len(plan.chunks) <= w.max_num_seqs
        assert len(s.running) <= w.max_num_seqs
        assert all(n >= 1 for n in sizes), sizes
        assert sizes == sorted(sizes, key=lambda n: n != 1), "decodes must come first"
        ids = [c.request.request_id for c in plan.chunks]
        assert len(ids) == len(set(ids)), ids
        for c in plan.chunks:
            r = c.request
            assert c.start == computed_before.get(r.request_id, c.start)
            assert c.start + c.num_new_tokens == r.num_computed_tokens <= r.num_tokens
            assert c.sample == (r.num_computed_tokens == r.num_tokens)
            if w.max_prefill_chunk is not None:
                assert c.num_new_tokens <= max(1, w.max_prefill_chunk)
        for r in plan.preempted:
            assert r.status is RequestStatus.PREEMPTED and not r.block_ids
            assert r.num_computed_tokens == 0
        assert list(s.waiting)[: len(plan.preempted)] == list(reversed(plan.preempted))
        for r in s.running:
            assert len(r.block_ids) == kv.num_blocks_needed(r.num_computed_tokens)
        assert all(not r.block_ids for r in s.waiting)
        keys = [r.queue_key for r in s.waiting]
        assert keys == sorted(keys), "the waiting queue is ordered by key, preempted first"
        held = sum(len(r.block_ids) for r in s.running)
        assert sum(pool.ref_count(b) for b in range(w.num_blocks)) == held

        for c in plan.chunks:
            for r in c.forks:
                by_id.setdefault(r.request_id, r)
        if not plan.empty:
            in_flight.append(plan)
        if in_flight and (len(in_flight) >= depth or plan.empty):
            done = in_flight.popleft()
            s.complete(done)
            for c in done.chunks:
                if not c.sample:
                    continue
                for r in (c.request, *c.forks):
                    if r.is_finished:  # aborted while in flight
                        continue
                    # A deterministic "model": the next token depends only on the tokens so far.
                    r.append_output_token(sum(r.all_token_ids) % 3)
                    if r.num_output_tokens >= r.params.max_tokens:
                        s.finish(r, RequestStatus.FINISHED_LENGTH)
        step += 1

    for rid, r in by_id.items():
        if rid in aborted:
            assert r.status is RequestStatus.FINISHED_ABORTED
            assert r.num_output_tokens < r.params.max_tokens
        else:
            assert r.status is RequestStatus.FINISHED_LENGTH, (rid, r.status)
            assert r.num_output_tokens == r.params.max_tokens
    for a in w.arrivals:
        choices = [r for rid, r in by_id.items() if rid.split("#")[0] == a.rid]
        if not any(r.request_id in aborted for r in choices):
            assert len(choices) == a.n
    assert kv.num_free_blocks == w.num_blocks
    assert [pool.ref_count(b) for b in range(w.num_blocks)] == [0] * w.num_blocks
    assert not s.requests and not s.running and not s.waiting


@settings(deadline=None, max_examples=50)
@given(workloads())
def test_random_workloads_terminate_and_finish_every_request(w: Workload):
    simulate(w)


# A running n=3 request still in chunked prefill must keep seats for its children: r1 waits.
_FORK_PAST_MAX_NUM_SEQS = Workload(
    block_size=4,
    num_blocks=8,
    max_num_seqs=3,
    max_num_batched_tokens=16,
    max_prefill_chunk=4,
    enable_prefix_caching=False,
    arrivals=(
        Arrival("r0", (0, 1) * 5, max_tokens=2, n=3, arrive_step=0, abort_step=None),
        Arrival("r1", (2, 2, 2), max_tokens=8, n=1, arrive_step=0, abort_step=None),
    ),
)


@settings(deadline=None, max_examples=50)
@example(_FORK_PAST_MAX_NUM_SEQS)
@given(workloads(max_n=3))
def test_random_workloads_with_several_choices(w: Workload):
    simulate(w)


# Found by hypothesis: the oldest request (r0) preempted itself whenever its newer sibling was
# in flight, and the two took turns recomputing forever. Now the older one waits instead.
_OLDEST_PREEMPTED_BY_IN_FLIGHT = Workload(
    block_size=4,
    num_blocks=5,
    max_num_seqs=3,
    max_num_batched_tokens=2,
    max_prefill_chunk=None,
    enable_prefix_caching=False,
    arrivals=(
        Arrival("r0", (0,) * 10, max_tokens=4, n=2, arrive_step=0, abort_step=None),
        Arrival("r1", (0,), max_tokens=10, n=1, arrive_step=1, abort_step=None),
    ),
)


@settings(deadline=None, max_examples=50)
@example(_OLDEST_PREEMPTED_BY_IN_FLIGHT, 2)
@given(workloads(max_n=3), st.integers(2, 3))
def test_random_workloads_with_steps_in_flight(w: Workload, depth: int):
    """Pipeline micro-batches: no request is in two steps at once or preempted mid-step,
    aborts during a step leak nothing, and every request still finishes."""
    simulate(w, depth)
