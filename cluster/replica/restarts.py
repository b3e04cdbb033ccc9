"""A replica's shards, replaced whole after a failure: the executor its engine steps on.

A failed step kills every shard at once (survivors may be stuck in a collective with the lost
one) and raises, so the engine fails its running requests without waiting; fresh shards start
on a background thread, and the next step waits for them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

from kvtide.cluster.replica.executor import RayExecutor
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

    NOTE: ``forward`` runs on the engine's stepping thread only; ``current`` and ``shutdown``
    may run on another thread, so the swap of workers is under ``_lock``.
    """

    def __init__(self, start: Callable[[], RayExecutor], max_in_flight: int) -> None:
        self._start = start
        self._lock = threading.Lock()
        self._closed = False
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

    def _on_failure(self, workers: RayExecutor) -> None:
        with self._lock:
            current = workers is self._workers
        if current:  # the first failed step of several in flight restarts; the rest just fail
            logger.exception("a shard failed; restarting every shard of the replica")
            workers.shutdown()
            self._restart()

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
            if self._closed:
                return
            self._workers, self._starting = None, starting
        name = "kvtide-replica-start" if first else "kvtide-replica-restart"
        threading.Thread(target=self._start_into, args=(starting,), name=name, daemon=True).start()

    def _start_into(self, starting: Future[RayExecutor]) -> None:
        try:
            workers = self._start()
        except BaseException as exc:  # noqa: BLE001 - handed to the stepping thread
            starting.set_exception(exc)
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self._workers, self._starting = workers, None
                self.num_restarts += starting is not self.started
        if closed:
            workers.shutdown()
            starting.set_exception(RuntimeError("the replica was shut down while its shards restarted"))
        else:
            starting.set_result(workers)


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
