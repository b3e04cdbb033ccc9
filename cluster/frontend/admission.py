"""Admission: at most ``max_in_flight`` requests stream at once, at most ``max_queued`` wait for
a slot, and none is admitted while the server drains."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from kvtide.cluster.frontend.errors import DRAINING, Code, ServingError
from kvtide.cluster.frontend.requests import FrontendConfig

Deadline = Callable[[Awaitable, float, str], Awaitable]
"""(awaitable, arrival_s, what it was doing) -> its result, or DEADLINE_EXCEEDED."""


class Admission:
    def __init__(self, config: FrontendConfig) -> None:
        self.config = config
        self._slots = asyncio.Semaphore(config.max_in_flight)
        self.num_queued = 0
        self.num_in_flight = 0
        self.draining = False

    @contextlib.asynccontextmanager
    async def admitted(self, arrival_s: float, within_deadline: Deadline) -> AsyncIterator[None]:
        """Hold a slot for the body of the ``async with``; raises ServingError when the queue is
        full (RESOURCE_EXHAUSTED, with a retry hint), when draining (UNAVAILABLE) or when the
        request's deadline passes while it waits."""
        if self.draining:
            raise ServingError(Code.UNAVAILABLE, DRAINING)
        if self._slots.locked() and self.num_queued >= self.config.max_queued:
            raise ServingError(
                Code.RESOURCE_EXHAUSTED,
                f"the admission queue is full: {self.num_queued} requests waiting (max_queued="
                f"{self.config.max_queued}); retry after {self.config.retry_after_s:g} s",
                retry_after_s=self.config.retry_after_s,
            )
        self.num_queued += 1
        try:
            # cancelled or timed out here: the request never reached a replica
            await within_deadline(self._slots.acquire(), arrival_s, "waiting for admission")
        finally:
            self.num_queued -= 1
        if self.draining:  # drain began while it waited: a slot freed by drain's aborts
            self._slots.release()
            raise ServingError(Code.UNAVAILABLE, DRAINING)
        self.num_in_flight += 1
        try:
            yield
        finally:
            self.num_in_flight -= 1
            self._slots.release()
