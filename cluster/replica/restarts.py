"""A replica's shards, replaced whole after a failure: the executor its engine steps on.

A failed step kills every shard at once (survivors may be stuck in a collective with the lost
one) and raises, so the engine fails its running requests without waiting; fresh shards start
on a background thread, and the next step waits for them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from kvtide.cluster.replica.executor import RayExecutor
from kvtide.cluster.state.health import ReplicaState
from kvtide.workers import StepDelta, StepOutput

logger = logging.getLogger(__name__)


class RestartingExecutor:
    """The engine's executor: the replica's Ray workers, replaced whole after a failure.

    The first start runs on a background thread too (``started`` resolves when it is done), so
    the replica actor's event loop never blocks on Ray. A failed step kills every shard at
    once (survivors may be stuck in a collective with the lost one) and raises, so the engine
    fails its running requests without waiting; fresh shards start on a background thread, and
    the next step waits for them. If they cannot start, that step fails too and another start
    begins. A first start that fails is not retried: the replica is broken, and says why.

    Restarts back off exponentially (``backoff_s`` doubling up to ``max_backoff_s``), and a
    crash-loop breaker stops them after ``max_failures`` failures within ``failure_window_s``:
    the replica is then broken, and every step fails at once saying so. ``state`` says which
    of these it is in, for the replica's health.

    NOTE: ``forward`` runs on the engine's stepping thread only; ``current`` and ``shutdown``
    may run on another thread, so the swap of workers is under ``_lock``.
    """

    def __init__(
        self,
        start: Callable[[Callable[[], None]], RayExecutor],
        max_in_flight: int,
        *,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        max_failures: int = 5,
        failure_window_s: float = 600.0,
    ) -> None:
        """``start(on_waiting)`` starts the shards; it calls ``on_waiting()`` while the cluster
        cannot place them yet."""
        self._start = start
        self._lock = threading.Lock()
        self._closed = False
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.max_failures, self.failure_window_s = max_failures, failure_window_s
        self._failures: deque[float] = deque()
        self.state = ReplicaState.STARTING
        self.broken_reason = ""
        self._workers: RayExecutor | None = None
        self._max_in_flight = max_in_flight
        self._starting: Future[RayExecutor] | None = None
        self.num_restarts = 0
        """Completed restarts."""
        self.started: Future[RayExecutor] = Future()
        """The first start: its shards, or why they could not start."""
        self._restart(self.started)

    def current(self) -> RayExecutor:
        """The running shards; raises ``RuntimeError`` while they restart or after shutdown."""
        with self._lock:
            if self._workers is None:
                raise RuntimeError(
                    "the replica is shut down" if self._closed else "the replica's shards are restarting"
                )
            return self._workers

    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight

    def submit(self, delta: StepDelta) -> WatchedStep:
        try:
            workers = self._ready_workers()
            return WatchedStep(self, workers, workers.submit(delta))
        except Exception as exc:  # noqa: BLE001 - the step fails; the engine hears it from result()
            return WatchedStep(self, None, None, exc)

    def _on_failure(self, workers: RayExecutor, why: str = "a shard failed the step") -> None:
        with self._lock:
            current = workers is self._workers
        if current:  # the first failed step of several in flight restarts; the rest just fail
            logger.warning("%s; restarting every shard of the replica", why)
            workers.shutdown()
            self._restart()

    def restart(self, why: str) -> None:
        """The shards are known bad (e.g. one stopped answering a health check): replace them."""
        with self._lock:
            workers = self._workers
        if workers is not None:
            self._on_failure(workers, why)

    def shutdown(self) -> None:
        """Kill the shards and free their placement (idempotent). A restart under way cleans
        up after itself when it finishes."""
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, None
        if workers is not None:
            workers.shutdown()

    def _ready_workers(self) -> RayExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("the replica is shut down")
            if self.state is ReplicaState.BROKEN:
                raise RuntimeError(self.broken_reason)
            workers, starting = self._workers, self._starting
        if workers is not None:
            return workers
        assert starting is not None, "no workers and no restart under way"
        try:
            return starting.result()  # RayExecutor bounds its own start by start_timeout_s
        except Exception as exc:
            if starting is self.started:
                raise RuntimeError(f"the replica's shards could not be started: {exc}") from exc
            self._restart()
            raise RuntimeError(f"the replica's shards could not be restarted: {exc}") from exc

    def _restart(self, starting: Future[RayExecutor] | None = None) -> None:
        starting = starting or Future()
        first = starting is self.started
        with self._lock:
            if self._closed or self.state is ReplicaState.BROKEN:
                return
            if not first:
                now = time.monotonic()
                self._failures.append(now)
                while self._failures and now - self._failures[0] > self.failure_window_s:
                    self._failures.popleft()
                if len(self._failures) >= self.max_failures:
                    self.state = ReplicaState.BROKEN
                    self.broken_reason = (
                        f"the replica's shards failed {len(self._failures)} times within {self.failure_window_s:g} s; "
                        "it is not restarted again (crash-loop breaker)"
                    )
                    logger.error(self.broken_reason)
                    self._workers, self._starting = None, None
                    starting.set_exception(RuntimeError(self.broken_reason))
                    return
                self.state = ReplicaState.RESTARTING
            self._workers, self._starting = None, starting
        name = "kvtide-replica-start" if first else "kvtide-replica-restart"
        threading.Thread(target=self._start_into, args=(starting,), name=name, daemon=True).start()

    def _start_into(self, starting: Future[RayExecutor]) -> None:
        if starting is not self.started:  # back off: a shard that fails at once must not spin
            delay_s = min(self.max_backoff_s, self.backoff_s * 2 ** max(0, len(self._failures) - 1))
            time.sleep(delay_s)
        try:
            workers = self._start(self._waiting)
        except BaseException as exc:  # noqa: BLE001 - handed to the stepping thread
            if starting is self.started:
                self.state, self.broken_reason = ReplicaState.BROKEN, f"the replica's shards could not be started: {exc}"
            starting.set_exception(exc)
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self._workers, self._starting = workers, None
                self.num_restarts += starting is not self.started
                self.state = ReplicaState.SERVING
        if closed:
            workers.shutdown()
            starting.set_exception(RuntimeError("the replica was shut down while its shards restarted"))
        else:
            starting.set_result(workers)


    def _waiting(self) -> None:
        self.state = ReplicaState.WAITING_FOR_RESOURCES


class WatchedStep:
    """A step in flight on the current shards; its failure restarts them."""

    def __init__(self, owner: RestartingExecutor, workers, step, error: BaseException | None = None) -> None:
        self._owner, self._workers, self._step, self._error = owner, workers, step, error

    def result(self) -> StepOutput:
        if self._error is not None:
            raise self._error
        try:
            return self._step.result()
        except Exception:
            self._owner._on_failure(self._workers)
            raise
