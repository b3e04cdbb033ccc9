"""Scheduler alone, no model: exact chunks, block ids, victims and queue order.

The model is simulated: after each ``schedule()`` every sampling chunk's request (and each
child it forked) gets one output token, and a request with ``max_tokens`` outputs finishes.
Prefix caching is off unless a test says otherwise, so block ids follow the free queue only
(front = next allocated; a freed request's blocks go to the back, tail first).
"""

from __future__ import annotations

import pytest

from kvtide.workers.config import SchedulerConfig
from kvtide.workers.kv_cache_manager import KVCacheManager
from kvtide.workers.request import Request, RequestId, RequestStatus
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.scheduler import Scheduler, StepPlan

OUTPUT_TOKEN = 7


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_prefill_chunk: int | None = None,
    enable_prefix_caching: bool = False,
    queue_order_s_per_token: float = 0.0,
) -> Scheduler:
    """First come, first served unless a test orders the queue by prefill length."""
    config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_prefill_chunk, queue_order_s_per_token)
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
    return Scheduler(config, kv, fork_child_id=lambda parent, i: RequestId(f"{parent.request_id}#{i}"))


def make_request(
    rid: str, num_prompt_tokens: int, max_tokens: int = 4, n: int = 1, first: int = 10
) -> Request:
    """Prompt ``first, first + 1, ...``: distinct ``first`` values share no block."""
    prompt = list(range(first, first + num_prompt_tokens))
    return Request(RequestId(rid), prompt, SamplingParams(n=n, max_tokens=max_tokens))


def step(s: Scheduler) -> StepPlan:
    """One scheduler step plus the simulated model."""
    plan = s.schedule()
    simulate_model(s, plan)
    return plan


def simulate_model(s: Scheduler, plan: StepPlan) -> None:
    """Sample one token for each sampling chunk (and its forks); finish at max_tokens."""
    s.complete(plan)
    for chunk in plan.chunks:
        if chunk.sample:
            for r in (chunk.request, *chunk.forks):
                r.append_output_token(OUTPUT_TOKEN)
                if r.num_output_tokens >= r.params.max_tokens:
                    s.finish(r, RequestStatus.FINISHED_LENGTH)


def chunks(plan: StepPlan) -> list[tuple[str, int, int, bool]]:
    """(request id, start, num_new_tokens, sample) of each chunk, in plan order."""
    return [(c.request.request_id, c.start, c.num_new_tokens, c.sample) for c in plan.chunks]


def assert_all_free(s: Scheduler) -> None:
    pool = s.kv.pool
    assert s.kv.num_free_blocks == pool.num_blocks
    assert [pool.ref_count(b) for b in range(pool.num_blocks)] == [0] * pool.num_blocks


def run_to_end(s: Scheduler, max_steps: int = 200) -> list[StepPlan]:
    plans = []
    while s.num_unfinished:
        assert len(plans) < max_steps, "scheduler made no progress"
        plans.append(step(s))
    return plans


# -- token budget, chunking, ordering -------------------------------------------------------


def test_budget_split_between_decodes_and_chunked_prefill():
    s = make_scheduler(max_num_batched_tokens=10)
    a, b = make_request("a", 4, max_tokens=8), make_request("b", 20, max_tokens=1, first=40)
    s.add(a)
    plan = step(s)
    assert chunks(plan) == [("a", 0, 4, True)]
    assert a.block_ids == [0]

    s.add(b)
    plan = step(s)
    # a's decode takes 1 token, the rest of the budget goes to b's first chunk.
    assert chunks(plan) == [("a", 4, 1, True), ("b", 0, 9, False)]
    assert plan.num_batched_tokens == 10
    assert a.block_ids == [0, 1]
    assert b.block_ids == [2, 3, 4]

    plan = step(s)
    assert chunks(plan) == [("a", 5, 1, True), ("b", 9, 9, False)]
    assert plan.num_batched_tokens == 10
    assert b.block_ids == [2, 3, 4, 5, 6]

    plan = step(s)
    assert chunks(plan) == [("a", 6, 1, True), ("b", 18, 2, True)]
    assert plan.num_batched_tokens == 3
    assert b.status is RequestStatus.FINISHED_LENGTH  # max_tokens=1: done at its first token
    assert b.block_ids == []


def test_max_prefill_chunk_caps_each_prefill_and_decodes_come_first():
    s = make_scheduler(max_num_batched_tokens=8, max_prefill_chunk=5)
    s.add(make_request("a", 20, max_tokens=2))
    s.add(make_request("b", 3, max_tokens=4, first=40))
    assert chunks(step(s)) == [("a", 0, 5, False), ("b", 0, 3, True)]
    # a is first in the running list, but b's decode is placed before a's prefill chunk.
    assert chunks(step(s)) == [("b", 3, 1, True), ("a", 5, 5, False)]
    assert chunks(step(s)) == [("b", 4, 1, True), ("a", 10, 5, False)]
    # Only the chunk that reaches the last prompt token samples.
    assert chunks(step(s)) == [("b", 5, 1, True), ("a", 15, 5, True)]
    assert chunks(step(s)) == [("a", 20, 1, True)]
    assert s.num_unfinished == 0
    assert_all_free(s)


def test_max_prefill_chunk_of_one_still_completes():
    s = make_scheduler(max_prefill_chunk=1)
    r = make_request("a", 3, max_tokens=2)
    s.add(r)
    plans = run_to_end(s)
    assert [chunks(p) for p in plans] == [
        [("a", 0, 1, False)],
        [("a", 1, 1, False)],
        [("a", 2, 1, True)],
        [("a", 3, 1, True)],
    ]
    assert r.output_token_ids == [OUTPUT_TOKEN] * 2


def test_max_num_seqs_caps_the_batch():
    s = make_scheduler(max_num_seqs=2)
    s.add(make_request("a", 3, max_tokens=1))
    s.add(make_request("b", 3, max_tokens=3, first=20))
    s.add(make_request("c", 3, max_tokens=2, first=30))
    assert chunks(step(s)) == [("a", 0, 3, True), ("b", 0, 3, True)]
    assert [r.request_id for r in s.waiting] == ["c"]
    # a finished (max_tokens=1), which frees a seat for c.
    assert chunks(step(s)) == [("b", 3, 1, True), ("c", 0, 3, True)]
    assert chunks(step(s)) == [("b", 4, 1, True), ("c", 3, 1, True)]
    assert s.num_unfinished == 0
    assert_all_free(s)


def test_waiting_requests_are_admitted_in_arrival_order_under_the_budget():
    s = make_scheduler(max_num_batched_tokens=8)
    for rid, first in (("a", 10), ("b", 20), ("c", 30)):
        s.add(make_request(rid, 5, max_tokens=1, first=first))
    assert chunks(step(s)) == [("a", 0, 5, True), ("b", 0, 3, False)]
    assert [r.request_id for r in s.waiting] == ["c"]
    assert chunks(step(s)) == [("b", 3, 2, True), ("c", 0, 5, True)]
    assert s.num_unfinished == 0


def test_requests_arriving_together_start_shortest_prefill_first():
    s = make_scheduler(max_num_batched_tokens=8, queue_order_s_per_token=0.001)
    for rid, n, first in (("long", 12, 10), ("mid", 6, 30), ("short", 2, 50)):
        s.add(make_request(rid, n, max_tokens=1, first=first))
    assert [r.request_id for r in s.waiting] == ["short", "mid", "long"]
    assert chunks(step(s)) == [("short", 0, 2, True), ("mid", 0, 6, True)]
    assert chunks(step(s)) == [("long", 0, 8, False)]


def test_a_request_is_passed_only_by_arrivals_within_its_slack():
    """12 prompt tokens at 0.1 s each give ``long`` 1.2 s of slack: a 2-token request (0.2 s)
    arriving 1.5 s later does not pass it, one arriving 0.5 s later does."""
    s = make_scheduler(queue_order_s_per_token=0.1)
    long = make_request("long", 12, first=10)
    long.arrival_time = 100.0
    s.add(long)
    late = make_request("late", 2, first=30)
    late.arrival_time = 101.5  # key 101.7, long's key 101.2
    s.add(late)
    soon = make_request("soon", 2, first=50)
    soon.arrival_time = 100.5  # key 100.7
    s.add(soon)
    assert [r.request_id for r in s.waiting] == ["soon", "long", "late"]
    assert [r.queue_key for r in s.waiting] == pytest.approx([100.7, 101.2, 101.7])


def test_prefix_cache_hits_count_as_no_prefill_in_the_order():
    s = make_scheduler(max_num_batched_tokens=64, queue_order_s_per_token=0.001, enable_prefix_caching=True)
    s.add(make_request("history", 13, max_tokens=1))
    run_to_end(s)
    # The same 13 tokens again: 3 full blocks cached, 1 token to compute; 9 uncached tokens else.
    s.add(make_request("fresh", 9, max_tokens=1, first=40))
    s.add(make_request("next-turn", 13, max_tokens=1))
    assert [r.request_id for r in s.waiting] == ["next-turn", "fresh"]


def test_preempted_requests_stay_ahead_of_new_short_ones():
    s = make_scheduler(num_blocks=4, queue_order_s_per_token=0.001)
    a = make_request("a", 4, max_tokens=8)
    b = make_request("b", 4, max_tokens=8, first=20)
    s.add(a)
    s.add(b)
    while not s.num_preemptions:
        step(s)
    assert s.waiting[0] is b and b.status is RequestStatus.PREEMPTED
    s.add(make_request("c", 1, max_tokens=1, first=40))
    assert [r.request_id for r in s.waiting] == ["b", "c"]


# -- KV pressure --------------------------------------------------------------------------


def test_waiting_request_that_does_not_fit_waits_and_blocks_later_ones():
    s = make_scheduler(num_blocks=4)
    a = make_request("a", 7, max_tokens=2)
    s.add(a)
    assert chunks(step(s)) == [("a", 0, 7, True)]
    assert a.block_ids == [0, 1]

    b = make_request("b", 9, max_tokens=1, first=20)  # 3 blocks; only 2 are free
    c = make_request("c", 2, max_tokens=1, first=40)  # would fit, but arrives after b
    s.add(b)
    s.add(c)
    plan = step(s)
    assert chunks(plan) == [("a", 7, 1, True)]
    assert plan.preempted == ()
    assert s.num_preemptions == 0
    assert b.block_ids == [] and c.block_ids == []
    assert b.status is c.status is RequestStatus.WAITING

    # a finished and freed [1, 0] (tail first) behind the never-used [2, 3].
    assert a.status is RequestStatus.FINISHED_LENGTH
    plan = s.schedule()
    assert chunks(plan) == [("b", 0, 9, True), ("c", 0, 2, True)]
    assert (b.block_ids, c.block_ids) == ([2, 3, 1], [0])
    simulate_model(s, plan)
    assert b.status is c.status is RequestStatus.FINISHED_LENGTH
    assert_all_free(s)


def test_preempts_most_recent_running_request_which_resumes_first():
    s = make_scheduler(num_blocks=4)
    a = make_request("a", 4, max_tokens=8)
    b = make_request("b", 4, max_tokens=8, first=20)
    s.add(a)
    s.add(b)
    assert chunks(step(s)) == [("a", 0, 4, True), ("b", 0, 4, True)]
    assert (a.block_ids, b.block_ids) == ([0], [1])
    for _ in range(4):  # positions 4..7 fit in each request's second block
        plan = step(s)
        assert [c.request for c in plan.chunks] == [a, b] and plan.preempted == ()
    assert (a.block_ids, b.block_ids) == ([0, 2], [1, 3])
    assert s.kv.num_free_blocks == 0

    c = make_request("c", 4, max_tokens=1, first=40)
    s.add(c)
    # Position 8 needs a third block each; none is free, so b (the newest) is preempted.
    plan = step(s)
    assert chunks(plan) == [("a", 8, 1, True)]
    assert plan.preempted == (b,)
    assert s.num_preemptions == 1 and b.num_preemptions == 1
    assert b.status is RequestStatus.PREEMPTED
    assert b.block_ids == [] and b.num_computed_tokens == 0
    assert b.num_output_tokens == 5  # outputs are kept and recomputed later
    assert a.block_ids == [0, 2, 3]  # b freed [3, 1]; a took 3
    assert [r.request_id for r in s.waiting] == ["b", "c"]
    assert s.running == [a]

    # b needs 3 blocks for its 9 tokens; 1 is free, so b and c (behind it) wait for a.
    for _ in range(2):
        plan = step(s)
        assert chunks(plan)[0][0] == "a" and len(plan.chunks) == 1
    assert a.status is RequestStatus.FINISHED_LENGTH
    assert a.output_token_ids == [OUTPUT_TOKEN] * 8

    # a freed [3, 2, 0] behind [1]: b recomputes prompt + 5 outputs, then c gets in.
    plan = step(s)
    assert chunks(plan) == [("b", 0, 9, True), ("c", 0, 4, True)]
    assert b.block_ids == [1, 3, 2]
    assert c.status is RequestStatus.FINISHED_LENGTH
    run_to_end(s)
    assert b.status is RequestStatus.FINISHED_LENGTH
    assert b.output_token_ids == [OUTPUT_TOKEN] * 8
    assert s.num_preemptions == 1
    assert_all_free(s)


def test_preempted_request_hits_its_own_cached_prompt_block_on_resume():
    s = make_scheduler(num_blocks=4, enable_prefix_caching=True)
    a = make_request("a", 4, max_tokens=6)
    b = make_request("b", 4, max_tokens=8, first=20)
    s.add(a)
    s.add(b)
    for _ in range(5):
        step(s)
    assert (a.block_ids, b.block_ids) == ([0, 2], [1, 3])
    plan = step(s)
    assert plan.preempted == (b,)
    assert a.block_ids == []  # a took block 3 (b's tail, evicting it) and then finished
    plan = s.schedule()
    # b's prompt block 1 is still cached; its 5 other tokens are recomputed.
    assert chunks(plan) == [("b", 4, 5, True)]
    assert b.block_ids == [1, 3, 2]
    assert b.num_cached_prompt_tokens == 4
    simulate_model(s, plan)
    run_to_end(s)
    assert b.output_token_ids == [OUTPUT_TOKEN] * 8
    assert_all_free(s)


# -- abort --------------------------------------------------------------------------------


def test_abort_waiting_and_running_requests_frees_blocks_at_once():
    s = make_scheduler(num_blocks=8, max_num_seqs=1)
    a = make_request("a", 6, max_tokens=8)
    b = make_request("b", 3, max_tokens=8, first=20)
    s.add(a)
    s.add(b)
    step(s)
    assert a.block_ids == [0, 1] and s.kv.num_free_blocks == 6
    assert [r.request_id for r in s.waiting] == ["b"]

    assert s.abort([RequestId("b"), RequestId("unknown")]) == [b]
    assert b.status is RequestStatus.FINISHED_ABORTED
    assert not s.waiting and s.kv.num_free_blocks == 6

    assert s.abort([RequestId("a")]) == [a]
    assert a.status is RequestStatus.FINISHED_ABORTED
    assert a.block_ids == [] and s.running == [] and s.num_unfinished == 0
    assert_all_free(s)
    assert step(s).empty
    assert s.abort([RequestId("a")]) == []  # finished ids are unknown


def test_abort_of_a_preempted_request_removes_it_from_waiting():
    s = make_scheduler(num_blocks=2)
    a = make_request("a", 2, max_tokens=6)
    b = make_request("b", 2, max_tokens=6, first=20)
    s.add(a)
    s.add(b)
    for _ in range(4):  # the 4th step needs a second block for a: b is preempted
        step(s)
    assert s.waiting[0] is b and b.status is RequestStatus.PREEMPTED
    assert s.abort([RequestId("b")]) == [b]
    assert list(s.waiting) == []
    run_to_end(s)
    assert a.output_token_ids == [OUTPUT_TOKEN] * 6
    assert_all_free(s)


# -- n > 1 ----------------------------------------------------------------------------------


def test_fork_children_share_blocks_then_copy_on_write():
    s = make_scheduler()
    a = make_request("a", 6, max_tokens=3, n=3)
    s.add(a)
    plan = step(s)
    assert chunks(plan) == [("a", 0, 6, True)]
    (chunk,) = plan.chunks
    assert [r.request_id for r in chunk.forks] == ["a#1", "a#2"]
    c1, c2 = chunk.forks
    assert [r.index for r in (a, c1, c2)] == [0, 1, 2]
    assert c1.parent_id == c2.parent_id == "a"
    assert a.block_ids == c1.block_ids == c2.block_ids == [0, 1]
    assert [s.kv.pool.ref_count(b) for b in (0, 1)] == [3, 3]
    assert s.running == [a, c1, c2]

    plan = step(s)
    assert chunks(plan) == [("a", 6, 1, True), ("a#1", 6, 1, True), ("a#2", 6, 1, True)]
    # The shared partial block 1 is written by all three: the first two copy it, the
    # last one keeps it.
    assert plan.block_copies == ((1, 2), (1, 3))
    assert (a.block_ids, c1.block_ids, c2.block_ids) == ([0, 2], [0, 3], [0, 1])
    assert [s.kv.pool.ref_count(b) for b in (0, 1, 2, 3)] == [3, 1, 1, 1]

    plan = step(s)
    assert plan.block_copies == ()
    assert all(r.output_token_ids == [OUTPUT_TOKEN] * 3 for r in (a, c1, c2))
    assert s.num_unfinished == 0
    assert_all_free(s)


def test_fork_after_chunked_prefill_schedules_children_once():
    s = make_scheduler(max_prefill_chunk=4)
    a = make_request("a", 10, max_tokens=3, n=3)
    s.add(a)
    assert chunks(step(s)) == [("a", 0, 4, False)]
    assert chunks(step(s)) == [("a", 4, 4, False)]
    plan = step(s)
    assert chunks(plan) == [("a", 8, 2, True)]
    assert [r.request_id for r in plan.chunks[0].forks] == ["a#1", "a#2"]
    # The children join from the next step.
    assert chunks(step(s)) == [("a", 10, 1, True), ("a#1", 10, 1, True), ("a#2", 10, 1, True)]


def test_max_num_seqs_counts_the_choices_of_a_waiting_request():
    s = make_scheduler(max_num_seqs=3)
    s.add(make_request("a", 3, max_tokens=2))
    s.add(make_request("b", 3, max_tokens=2, n=3, first=20))
    # b needs 3 seats, a holds 1: b waits for a.
    assert chunks(step(s)) == [("a", 0, 3, True)]
    assert chunks(step(s)) == [("a", 3, 1, True)]
    assert chunks(step(s)) == [("b", 0, 3, True)]
    assert [r.request_id for r in s.running] == ["b", "b#1", "b#2"]
    assert len(step(s).chunks) == 3
    assert s.num_unfinished == 0


def test_max_num_seqs_counts_the_choices_of_a_running_unforked_request():
    # a is admitted first (3 seats); b must not take a seat a's children will need.
    s = make_scheduler(max_num_seqs=3, max_prefill_chunk=4)
    s.add(make_request("a", 10, max_tokens=2, n=3))
    s.add(make_request("b", 3, max_tokens=8, first=40))
    for _ in range(12):
        plan = step(s)
        assert len(plan.chunks) <= 3
        assert len(s.running) <= 3
    assert s.num_unfinished == 0


def test_duplicate_request_id_is_rejected():
    s = make_scheduler()
    s.add(make_request("a", 3))
    with pytest.raises(ValueError, match="request_id 'a' is already in use"):
        s.add(make_request("a", 5))
    assert [r.num_prompt_tokens for r in s.waiting] == [3]


@pytest.mark.parametrize("value", [-0.001, float("inf"), float("nan")])
def test_engine_config_rejects_a_queue_order_that_is_negative_or_not_finite(value):
    from kvtide.cluster.cli import flag_error
    from kvtide.workers.config import EngineConfig, resolve
    from tests.tiny import tiny_llama_config

    config = EngineConfig.from_kwargs(model="m", queue_order_s_per_token=value)
    with pytest.raises(ValueError, match="queue_order_s_per_token must be finite and >= 0, got") as err:
        resolve(config, "m", tiny_llama_config())
    assert flag_error(err.value).startswith(f"--queue-order-s-per-token must be finite and >= 0, got {value}")
