"""Load modes: a closed loop at fixed concurrency, an open loop with Poisson arrivals, and
trace replay at the trace's own arrival times. One event loop drives every stream.

Closed loop: ``concurrency`` users, each sending its session's turns one after another and
starting the next session when one ends; never more than ``concurrency`` requests in flight.
Open loop: sessions start at their arrival times whatever is still running (so queues build
when the rate exceeds what the server can serve, as in production).

A ``Budget`` hands out request tickets: the first ``warmup`` are warm-up (recorded, excluded
from the statistics); it stops after ``num_requests`` more, or once ``duration_s`` has passed
since the start, whichever comes first. Requests already running when it stops finish.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from kvtide.cluster.bench.backends import Backend, BenchRequest
from kvtide.cluster.bench.records import RequestRecord, measure
from kvtide.cluster.bench.workloads import Session


@dataclass(frozen=True)
class LoadPoint:
    mode: str
    """``concurrency`` (closed loop), ``rate`` (open loop, Poisson, requests/s) or ``trace``."""
    value: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("concurrency", "rate", "trace"):
            raise ValueError(f"load mode must be concurrency, rate or trace, got {self.mode!r}")
        if self.mode != "trace" and not (self.value and self.value > 0):
            raise ValueError(f"{self.mode} must be > 0, got {self.value}")
        if self.mode == "concurrency" and self.value != int(self.value):
            raise ValueError(f"concurrency must be a whole number, got {self.value}")

    @property
    def label(self) -> str:
        return "trace" if self.mode == "trace" else f"{self.mode}={self.value:g}"


@dataclass(frozen=True)
class StopRule:
    num_requests: int | None = None
    duration_s: float | None = None
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


@dataclass(frozen=True)
class Ticket:
    index: int
    warmup: bool


class Budget:
    def __init__(self, rule: StopRule, t0: float, clock: Callable[[], float]) -> None:
        self.rule, self._t0, self._clock = rule, t0, clock
        self._next = 0
        self._closed = False

    @property
    def total(self) -> int | None:
        return None if self.rule.num_requests is None else self.rule.num_requests + self.rule.warmup

    def take(self) -> Ticket | None:
        r = self.rule
        if self._closed or (self.total is not None and self._next >= self.total):
            return None
        if r.duration_s is not None and self._clock() - self._t0 >= r.duration_s:
            return None
        ticket = Ticket(self._next, self._next < r.warmup)
        self._next += 1
        return ticket

    def close(self) -> None:
        """No more tickets (the workload ran out of sessions)."""
        self._closed = True


def poisson_arrivals(rate: float, rng: np.random.Generator) -> Iterator[float]:
    """Arrival times (s) of a Poisson process of ``rate`` per second: 0, then exponential gaps."""
    t = 0.0
    while True:
        yield t
        t += float(rng.exponential(1.0 / rate))


@dataclass
class PointContext:
    """What the sessions of one load point share."""

    backend: Backend
    point: LoadPoint
    budget: Budget
    t0: float
    count_prompt: Callable[[tuple[tuple[str, str], ...]], int]
    """Tokens of a prompt the server did not count for us (its usage missing)."""
    on_record: Callable[[RequestRecord], None]
    clock: Callable[[], float] = time.perf_counter


async def run_session(session: Session, ctx: PointContext, ticket: Ticket) -> None:
    """Send the session's turns in order; a failed turn ends the conversation."""
    history: tuple[tuple[str, str], ...] = ()
    for k, turn in enumerate(session.turns):
        if k > 0:
            if session.think_time_s:
                await asyncio.sleep(session.think_time_s)
            ticket = ctx.budget.take()
            if ticket is None:
                return
        messages = (*history, ("user", turn.text))
        request = BenchRequest(f"bench-{ctx.point.label}-{ticket.index}", messages, turn.osl)
        out = await measure(ctx.backend, request, ctx.t0, ctx.clock)
        single = k == 0 and ctx.backend.target.endpoint == "completions"
        isl_target = turn.num_tokens if single else ctx.count_prompt(messages)
        isl = out.prompt_tokens if out.prompt_tokens is not None else isl_target
        ctx.on_record(RequestRecord(
            target=ctx.backend.target.name, point=ctx.point.label, session_id=session.session_id, turn=k,
            pattern=turn.pattern, warmup=ticket.warmup, start_s=out.start_s, isl=isl, isl_target=isl_target,
            osl_target=turn.osl,
            osl=out.completion_tokens if out.completion_tokens is not None else out.num_tokens,
            ttft_s=out.ttft_s, itl_s=out.itl_s, e2e_s=out.e2e_s,
            error_code=out.error.code if out.error else None, error_message=out.error.message if out.error else None,
            cached_tokens=out.cached_tokens,
        ))  # fmt: skip
        if out.error is not None:
            return
        history = (*messages, ("assistant", out.text))


async def closed_loop(sessions: Iterator[Session], concurrency: int, ctx: PointContext) -> None:
    async def user() -> None:
        while (ticket := ctx.budget.take()) is not None:
            session = next(sessions, None)
            if session is None:
                ctx.budget.close()
                return
            await run_session(session, ctx, ticket)

    await asyncio.gather(*(user() for _ in range(concurrency)))


async def open_loop(sessions: Iterator[Session], arrivals: Iterator[float] | None, ctx: PointContext) -> None:
    """``arrivals`` gives each session's start time; None uses the sessions' own ``arrival_s``."""
    tasks: list[asyncio.Task] = []
    for session in sessions:
        at = next(arrivals) if arrivals is not None else session.arrival_s
        if at is None:
            raise ValueError(f"session {session.session_id} has no arrival time; give a rate or a concurrency")
        delay = ctx.t0 + at - ctx.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        ticket = ctx.budget.take()
        if ticket is None:
            break
        tasks.append(asyncio.create_task(run_session(session, ctx, ticket)))
    await asyncio.gather(*tasks)


async def run_point(sessions: Iterator[Session], ctx: PointContext, seed: int) -> None:
    point = ctx.point
    if point.mode == "concurrency":
        await closed_loop(sessions, int(point.value), ctx)
    elif point.mode == "rate":
        await open_loop(sessions, poisson_arrivals(point.value, np.random.default_rng([seed, 1])), ctx)
    else:
        await open_loop(sessions, None, ctx)
