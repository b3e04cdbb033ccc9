"""asyncio front of an ``Engine``: a stream per request, cancellation, a stepping thread.

The engine steps on its own thread so the event loop stays free to accept requests and
aborts while a step runs. The loop never touches the engine's state: it hands requests and
aborts over a thread-safe queue as typed commands; the stepping thread applies them between
steps, so an abort frees its blocks before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kvtide.workers.engine import Engine
from kvtide.workers.engine_request import EngineRequest, check_request
from kvtide.workers.outputs import CompletionDelta

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Add:
    request: EngineRequest


@dataclass(frozen=True)
class _Abort:
    request_id: str
    index: int | None = None
    """One choice, or all of them (None)."""


_Command = _Add | _Abort


class EngineDeadError(RuntimeError):
    """The stepping thread stopped; no request can be served."""


class AsyncEngine:
    def __init__(self, engine: Engine, idle_wait_s: float = 0.5) -> None:
        self.engine = engine
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._dead: BaseException | None = None
        self._tick_s = time.monotonic()
        self._step_started_s: float | None = None
        self._thread = threading.Thread(target=self._run, name="kvtide-engine", daemon=True)
        self._thread.start()

    async def generate(self, request: EngineRequest) -> AsyncIterator[CompletionDelta]:
        """Stream the deltas of every choice until all have finished.

        A request not checked against this engine's limits is checked here, before anything is
        queued (``ValueError``). Cancelling the consumer (or closing the generator early)
        aborts the request in the engine.
        """
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead!r}")
        request_id = request.request_id
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if request.checked != self.engine.limits:
            request = check_request(
                request_id, request.prompt_token_ids, request.params, self.engine.limits, request.output_token_ids
            )
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(_Add(request))
        self._wake.set()
        remaining = request.params.n
        try:
            while remaining:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            self._streams.pop(request_id, None)
            if remaining:
                self.abort(request_id)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Abort a request (or only its choice ``index``) before the engine's next step."""
        self._commands.put(_Abort(request_id, index))
        self._wake.set()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop stepping; every open stream ends with ``EngineDeadError``."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout_s)
        self._dead = self._dead or EngineDeadError("engine shut down")
        for rid in list(self._streams):
            self._deliver(rid, EngineDeadError("engine shut down"))

    # -- the stepping thread ---------------------------------------------------------------

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            match command:
                case _Add(request):
                    try:
                        self.engine.add(request)
                    except ValueError as exc:  # e.g. a request id already in the engine
                        self._deliver(request.request_id, exc)
                case _Abort(request_id, index):
                    ended = self.engine.abort_request(request_id, index)
                    if index is not None:  # one choice: its stream still waits for the others
                        for i in ended:
                            self._deliver(request_id, CompletionDelta(request_id, i, (), finish_reason="abort"))

    @property
    def alive(self) -> bool:
        """The stepping thread runs."""
        return self._dead is None and self._thread.is_alive()

    def loop_ages_s(self) -> tuple[float, float | None]:
        """(seconds since the stepping loop last went round, seconds the step under way has
        taken, or None between steps): a loop that stops going round, or a step that never
        ends, is a hung engine."""
        now = time.monotonic()
        started = self._step_started_s
        return now - self._tick_s, None if started is None else now - started

    def _run(self) -> None:
        try:
            while not self._stop:
                self._tick_s = time.monotonic()
                self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
                    continue
                self._step_started_s = time.monotonic()
                deltas = self.engine.step()
                self._step_started_s = None
                for delta in deltas:
                    self._deliver(delta.request_id, delta)
        except BaseException as exc:  # noqa: BLE001 - every stream must hear about it
            logger.exception("engine thread died")
            self._dead = exc
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"engine stopped: {exc!r}"))

    def _deliver(self, request_id: str, item: object) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return  # the consumer left; its abort is on the way
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:
            pass  # the consumer's loop closed
