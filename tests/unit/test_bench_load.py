"""kvtide bench load modes against a fake backend: no server, no sleeps that matter, no
timing assertions (the schedules are checked, not the clock)."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from kvtide.cluster.bench.backends import BenchRequest, TargetConfig, render_transcript
from kvtide.cluster.bench.load import (
    Budget,
    LoadPoint,
    PointContext,
    StopRule,
    closed_loop,
    open_loop,
    poisson_arrivals,
    run_session,
)
from kvtide.cluster.bench.records import RequestRecord, measure
from kvtide.cluster.bench.sse import Chunk, StreamError
from kvtide.cluster.bench.workloads import Session, Turn


class FakeBackend:
    """Streams ``osl`` one-token chunks, yielding to the loop between them; tracks concurrency."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.target = TargetConfig("openai", "http://127.0.0.1:1/v1", label="fake")
        self.in_flight = self.most_in_flight = 0
        self.requests: list[BenchRequest] = []
        self.fail_on = fail_on

    async def stream(self, request: BenchRequest):
        self.requests.append(request)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            for i in range(request.osl):
                await asyncio.sleep(0)
                if self.fail_on and self.fail_on in request.messages[-1][1] and i == 1:
                    raise StreamError("500", "fake failure")
                yield Chunk(1, f" t{i}")
            words = len(render_transcript(request.messages).split())
            yield Chunk(0, prompt_tokens=words, completion_tokens=request.osl)
        finally:
            self.in_flight -= 1

    async def max_model_len(self):
        return None

    async def aclose(self):
        pass


def _sessions(n_turns: int = 1, prefix: str = "s"):
    for i in itertools.count():
        turns = tuple(Turn(f" {prefix}{i} turn{k}", 2, 3, f"turn {k + 1}") for k in range(n_turns))
        yield Session(i, turns)


def _context(backend, point, rule, clock=None):
    records: list[RequestRecord] = []
    clock = clock or (lambda: 0.0)
    ctx = PointContext(backend, point, Budget(rule, 0.0, clock), 0.0, lambda m: 99, records.append, clock)
    return ctx, records


@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_closed_loop_never_exceeds_its_concurrency_and_sends_the_budget(concurrency):
    backend = FakeBackend()
    ctx, records = _context(backend, LoadPoint("concurrency", concurrency), StopRule(num_requests=20, warmup=4))
    asyncio.run(closed_loop(_sessions(), concurrency, ctx))
    assert backend.most_in_flight == concurrency
    assert len(records) == 24 and sum(r.warmup for r in records) == 4
    assert sorted(r.session_id for r in records) == list(range(24))  # the workload's order, none skipped
    assert all(r.ok and r.osl == 3 and len(r.itl_s) == 2 for r in records)


def test_poisson_schedule_has_the_asked_mean_rate():
    arrivals = list(itertools.islice(poisson_arrivals(4.0, np.random.default_rng(0)), 20001))
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0.0 and (gaps > 0).all()
    assert gaps.mean() == pytest.approx(0.25, rel=0.02)
    assert gaps.std() == pytest.approx(0.25, rel=0.05)  # exponential: sd == mean
    again = list(itertools.islice(poisson_arrivals(4.0, np.random.default_rng(0)), 20001))
    assert again == arrivals


def test_budget_stops_at_the_count_or_the_duration():
    now = [0.0]
    b = Budget(StopRule(num_requests=3, warmup=1), 0.0, lambda: now[0])
    tickets = [b.take() for _ in range(6)]
    assert [t.warmup for t in tickets[:4]] == [True, False, False, False] and tickets[4:] == [None, None]
    timed = Budget(StopRule(duration_s=10.0), 0.0, lambda: now[0])
    assert timed.take().index == 0
    now[0] = 10.0
    assert timed.take() is None


def test_open_loop_replays_the_schedule_in_order_and_stops_at_the_budget():
    """Arrivals in the past are sent at once; the clock is fixed so nothing waits."""
    backend = FakeBackend()
    sessions = (Session(i, (Turn(f" q{i}", 2, 2, "trace"),), arrival_s=0.001 * i) for i in range(10))
    ctx, records = _context(backend, LoadPoint("trace"), StopRule(num_requests=6), clock=lambda: 1.0)
    asyncio.run(open_loop(sessions, None, ctx))
    assert [r.messages[0][1] for r in backend.requests] == [f" q{i}" for i in range(6)]
    assert len(records) == 6 and backend.most_in_flight > 1  # open loop: nobody waits for an answer


def test_open_loop_without_arrival_times_asks_for_a_load():
    ctx, _ = _context(FakeBackend(), LoadPoint("trace"), StopRule(num_requests=2))
    with pytest.raises(ValueError, match="session 0 has no arrival time; give a rate or a concurrency"):
        asyncio.run(open_loop(_sessions(), None, ctx))


def test_multi_turn_sends_the_real_answers_back_and_a_failure_ends_the_chat():
    backend = FakeBackend(fail_on="s1 turn1")
    ctx, records = _context(backend, LoadPoint("concurrency", 1), StopRule(num_requests=6))
    asyncio.run(closed_loop(_sessions(n_turns=3), 1, ctx))
    first, second = backend.requests[0].messages, backend.requests[1].messages
    assert first == (("user", " s0 turn0"),)
    assert second == (("user", " s0 turn0"), ("assistant", " t0 t1 t2"), ("user", " s0 turn1"))
    failed = [r for r in records if not r.ok]
    assert [(r.session_id, r.turn, r.error_code, r.osl) for r in failed] == [(1, 1, "500", 1)]
    assert [(r.session_id, r.turn) for r in records] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)]
    assert records[1].isl == len(render_transcript(second).split())  # the server's count wins
    assert records[1].isl_target == 99  # the bench tokenizer's count of the whole conversation


def test_measure_spreads_a_multi_token_message_over_its_tokens():
    class Burst(FakeBackend):
        async def stream(self, request):
            yield Chunk(1, "a")
            yield Chunk(3, "bcd")
            yield Chunk(0, prompt_tokens=5, completion_tokens=4)

    times = iter([10.0, 10.5, 11.0, 11.6, 11.7])
    out = asyncio.run(measure(Burst(), BenchRequest("r", (("user", "x"),), 4), t0=9.0, clock=lambda: next(times)))
    assert out.start_s == 1.0 and out.ttft_s == 0.5
    assert out.itl_s == pytest.approx((0.5 / 3,) * 3) and out.num_tokens == 4
    assert out.e2e_s == pytest.approx(1.7) and out.completion_tokens == 4 and out.text == "abcd"


def test_run_session_returns_when_the_budget_ends_mid_chat():
    backend = FakeBackend()
    ctx, records = _context(backend, LoadPoint("concurrency", 1), StopRule(num_requests=2))
    session = next(_sessions(n_turns=5))
    asyncio.run(run_session(session, ctx, ctx.budget.take()))
    assert [r.turn for r in records] == [0, 1]


def test_load_point_checks_its_value():
    assert LoadPoint("rate", 2.5).label == "rate=2.5" and LoadPoint("trace").label == "trace"
    with pytest.raises(ValueError, match="concurrency must be a whole number, got 2.5"):
        LoadPoint("concurrency", 2.5)
    with pytest.raises(ValueError, match="rate must be > 0, got 0"):
        LoadPoint("rate", 0)
