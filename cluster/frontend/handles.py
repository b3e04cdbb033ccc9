"""How the frontend talks to a replica: a small typed interface, so the gateway, the router feed
and their tests need no Ray. ``ray_handles.RayReplicaHandle`` is the one implementation that
makes Ray calls; tests use fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from kvtide.router import ReplicaLoad
from kvtide.workers import CompletionDelta, EngineRequest, KvSnapshot


class ReplicaGone(Exception):
    """The replica's process is dead: stop routing to it (a restarted one registers anew)."""


class ReplicaUnreachable(Exception):
    """The replica cannot be reached for now (it may come back; the call may or may not have run)."""


class ReplicaRejected(ValueError):
    """The replica's own check refused the request (its limits differ from the frontend's)."""


class ReplicaFailed(Exception):
    """The replica raised while serving the request."""


class StreamCancelled(Exception):
    """The stream was cancelled by this frontend (``ReplicaStream.cancel``)."""


class ReplicaStream(Protocol):
    """One request's deltas from its replica. Iterating raises the errors above. ``aclose``
    before the end cancels the call and aborts the request on the replica."""

    def __aiter__(self) -> AsyncIterator[CompletionDelta]: ...

    async def __anext__(self) -> CompletionDelta: ...

    def cancel(self) -> None:
        """End the stream from outside (drain): the consumer's next step raises StreamCancelled."""
        ...

    async def aclose(self) -> None: ...


class ReplicaHandle(Protocol):
    replica_id: str

    def generate(self, request: EngineRequest) -> ReplicaStream: ...

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Abort a request (or one choice of it) on the replica; fire and forget."""
        ...

    async def load(self) -> ReplicaLoad:
        """Its latest load; raises ReplicaGone / ReplicaUnreachable."""
        ...

    async def kv_snapshot(self) -> KvSnapshot: ...

    async def alive(self) -> bool:
        """False once the replica's process is known dead."""
        ...
