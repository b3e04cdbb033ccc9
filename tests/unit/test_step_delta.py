"""Step deltas: a shard's ``BatchState`` rebuilt from deltas alone packs exactly the batch
that the driver would pack from the requests themselves (``prepare_inputs``), through
preemption, copy-on-write forks, aborts, prefix-cache hits and a reset."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtide.workers.model_runner import plan_delta, prepare_inputs
from kvtide.workers.request import RequestStatus
from kvtide.workers.step_inputs import (
    BatchState,
    ChunkDelta,
    DeltaTracker,
    StepDelta,
    StepInputs,
)

from tests.unit.test_scheduler import OUTPUT_TOKEN, make_request, make_scheduler

CPU = torch.device("cpu")


def assert_same_inputs(got: StepInputs, want: StepInputs) -> None:
    for f in dataclasses.fields(StepInputs):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if f.name == "meta":
            for g in dataclasses.fields(a):
                x, y = getattr(a, g.name), getattr(b, g.name)
                assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), g.name
        else:
            assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), f.name


def finish_step(s, tracker, plan) -> None:
    s.complete(plan)
    for c in plan.chunks:
        if c.sample:
            for r in (c.request, *c.forks):
                r.append_output_token(OUTPUT_TOKEN + r.num_output_tokens)
                if r.num_output_tokens >= r.params.max_tokens:
                    s.finish(r, RequestStatus.FINISHED_LENGTH)
                    tracker.forget(r.request_id)


@settings(deadline=None, max_examples=40)
@given(
    num_blocks=st.integers(16, 24),  # each request fits alone (n = 3 included), not all at once
    prompts=st.lists(st.integers(1, 11), min_size=1, max_size=5),
    n=st.integers(1, 3),
    abort_at=st.integers(0, 12),
    reset_at=st.integers(0, 30),
)
def test_shard_batches_rebuilt_from_deltas_match_the_drivers(num_blocks, prompts, n, abort_at, reset_at):
    s = make_scheduler(num_blocks=num_blocks, block_size=2, max_num_batched_tokens=8, enable_prefix_caching=True)
    # Shared first tokens: later prompts hit the prefix cache of earlier ones.
    for i, length in enumerate(prompts):
        s.add(make_request(f"r{i}", length, max_tokens=4, n=n if i == 0 else 1, first=10))
    tracker, shard = DeltaTracker(), BatchState(2, CPU)
    for step in range(200):
        if not s.num_unfinished:
            break
        if step == abort_at and s.running:
            victim = s.running[-1]
            s.abort([victim.request_id])
            tracker.forget(victim.request_id)
        if step == reset_at:
            tracker.reset()
            shard.tables["stale"] = [1, 2]  # a restarted shard would not have it; reset drops it
        plan = s.schedule()
        if plan.empty:
            continue
        assert_same_inputs(shard.apply(plan_delta(tracker, plan)), prepare_inputs(plan, 2, CPU))
        assert "stale" not in shard.tables or step < reset_at
        finish_step(s, tracker, plan)
    assert not s.num_unfinished
    shard.apply(tracker.delta([], ()))
    assert shard.tables == {}, "tables of ended requests stay on the shard"


def test_a_long_running_request_sends_only_its_new_blocks():
    s = make_scheduler(block_size=2)
    s.add(make_request("a", 5, max_tokens=6))
    tracker = DeltaTracker()
    sent = []
    while s.num_unfinished:
        plan = s.schedule()
        sent.append(plan_delta(tracker, plan).chunks[0])
        finish_step(s, tracker, plan)
    # prefill: 5 tokens, 3 blocks; then 5 decodes (positions 5..9), one new block at 6 and 8.
    assert [(c.start, len(c.token_ids), c.keep_blocks, c.new_blocks) for c in sent] == [
        (0, 5, 0, (0, 1, 2)),
        (5, 1, 3, ()),
        (6, 1, 3, (3,)),
        (7, 1, 4, ()),
        (8, 1, 4, (4,)),
        (9, 1, 5, ()),
    ]
    assert tracker.delta([], ()).freed == ("a",)


def test_a_delta_that_keeps_more_than_the_shard_holds_is_an_error():
    shard = BatchState(2, CPU)
    chunk = ChunkDelta("x", start=4, token_ids=(3,), sample=True, keep_blocks=2, new_blocks=(9,))
    with pytest.raises(RuntimeError, match=r"keeps 2 blocks of request 'x' but this shard holds 0"):
        shard.apply(StepDelta((chunk,), ()))
