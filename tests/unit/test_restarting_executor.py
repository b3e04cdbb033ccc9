"""The replica's restart logic, with fake shard sets instead of Ray (no processes started)."""

from __future__ import annotations

import threading

import pytest
import torch

from kvtide.cluster.replica.restarts import RestartingExecutor


class FakeShards:
    """Stands in for a RayExecutor: returns fixed logits or raises, records shutdown."""

    max_in_flight = 2

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail, self.closed = name, fail, False

    def submit(self, delta) -> FakeStep:
        return FakeStep(self)

    def shutdown(self) -> None:
        self.closed = True


class FakeStep:
    def __init__(self, shards: FakeShards) -> None:
        self.shards = shards

    def result(self) -> torch.Tensor:
        if self.shards.fail:
            raise RuntimeError(f"shard of {self.shards.name} died")
        return torch.full((1, 2), float(len(self.shards.name)))


def run_step(ex: RestartingExecutor) -> torch.Tensor:
    return ex.submit(None).result()


def starter(*outcomes):
    """A start function that returns (or raises) the given outcomes in order."""
    made, queue = [], list(outcomes)

    def start(on_waiting=None):
        outcome = queue.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        made.append(outcome)
        return outcome

    return start, made


def test_a_failed_step_raises_kills_the_shards_and_the_next_step_runs_on_fresh_ones():
    start, made = starter(FakeShards("a", fail=True), FakeShards("bb"))
    ex = RestartingExecutor(start, max_in_flight=2, backoff_s=0)
    with pytest.raises(RuntimeError, match="shard of a died"):
        run_step(ex)
    assert made[0].closed
    assert run_step(ex).tolist() == [[2.0, 2.0]]
    assert ex.num_restarts == 1
    assert ex.current() is made[1]


def test_a_failed_restart_fails_the_next_step_and_starts_again():
    start, made = starter(FakeShards("a", fail=True), OSError("no node has room"), FakeShards("ccc"))
    ex = RestartingExecutor(start, max_in_flight=2, backoff_s=0)
    with pytest.raises(RuntimeError, match="died"):
        run_step(ex)
    with pytest.raises(RuntimeError, match="could not be restarted: no node has room"):
        run_step(ex)
    assert run_step(ex).tolist() == [[3.0, 3.0]]
    assert ex.num_restarts == 1


def test_shutdown_during_a_restart_shuts_the_new_shards_down():
    gate = threading.Event()
    late = FakeShards("late")

    def start_late():
        gate.wait(10)
        return late

    shards = iter([FakeShards("a", fail=True)])
    ex = RestartingExecutor(lambda _: next(shards, None) or start_late(), max_in_flight=2, backoff_s=0)
    with pytest.raises(RuntimeError):
        run_step(ex)
    ex.shutdown()
    gate.set()
    with pytest.raises(RuntimeError, match="shut down"):
        run_step(ex)
    for _ in range(100):
        if late.closed:
            break
        threading.Event().wait(0.05)
    assert late.closed
    ex.shutdown()  # idempotent


def test_two_failed_steps_in_flight_restart_the_shards_once():
    start, made = starter(FakeShards("a", fail=True), FakeShards("bb"))
    ex = RestartingExecutor(start, max_in_flight=2, backoff_s=0)
    assert ex.max_in_flight == 2
    first, second = ex.submit(None), ex.submit(None)
    for step in (first, second):
        with pytest.raises(RuntimeError, match="shard of a died"):
            step.result()
    assert run_step(ex).tolist() == [[2.0, 2.0]]
    assert ex.num_restarts == 1 and len(made) == 2


def test_the_first_start_runs_in_the_background_and_a_failed_one_is_not_retried():
    gate = threading.Event()
    attempts = []

    def start(on_waiting):
        attempts.append(1)
        gate.wait(10)
        raise OSError("no node has room")

    ex = RestartingExecutor(start, max_in_flight=1)  # returns before the start finishes
    assert not ex.started.done()
    gate.set()
    with pytest.raises(OSError, match="no node has room"):
        ex.started.result(10)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="could not be started: no node has room"):
            run_step(ex)
    assert len(attempts) == 1 and ex.num_restarts == 0


def test_restarts_back_off_and_a_crash_loop_stops_them_saying_so():
    """Every fresh set of shards fails its first step: restarts come with growing pauses, and
    after max_failures within the window the replica is broken and fails steps at once."""
    made = []

    def start(on_waiting):
        made.append(FakeShards("x" * (len(made) + 1), fail=True))
        return made[-1]

    ex = RestartingExecutor(start, max_in_flight=1, backoff_s=0.05, max_failures=3, failure_window_s=60)
    errors = []
    for _ in range(6):
        with pytest.raises(RuntimeError) as err:
            run_step(ex)
        errors.append(str(err.value))
    assert ex.state.value == "broken" and "3 times within 60 s" in ex.broken_reason
    assert len(made) == 3  # the first start and two restarts; no more after the breaker
    assert errors[-1] == ex.broken_reason


def test_a_start_the_cluster_cannot_place_yet_reports_waiting_for_resources():
    gate = threading.Event()

    def start(on_waiting):
        on_waiting()
        gate.wait(10)
        return FakeShards("a")

    ex = RestartingExecutor(start, max_in_flight=1)
    for _ in range(100):
        if ex.state.value == "waiting_for_resources":
            break
        threading.Event().wait(0.01)
    assert ex.state.value == "waiting_for_resources"
    gate.set()
    ex.started.result(10)
    assert ex.state.value == "serving"
