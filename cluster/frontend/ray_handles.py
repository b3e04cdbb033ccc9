"""The Ray implementation of ``handles.ReplicaHandle``: the frontend's only Ray calls to replicas.
Ray's exceptions become the handle's typed errors here, and nowhere else."""

from __future__ import annotations

from typing import Any

import ray

from kvtide.cluster.frontend.handles import (
    ReplicaFailed,
    ReplicaGone,
    ReplicaRejected,
    ReplicaUnreachable,
    StreamCancelled,
)
from kvtide.router import ReplicaLoad
from kvtide.workers import CompletionDelta, EngineRequest, KvSnapshot


class RayReplicaHandle:
    def __init__(self, replica_id: str, actor: Any) -> None:
        self.replica_id = replica_id
        self.actor = actor
        """The ``ReplicaActor`` handle."""

    def generate(self, request: EngineRequest) -> RayReplicaStream:
        stream = self.actor.generate.options(num_returns="streaming").remote(request)
        return RayReplicaStream(self, request.request_id, stream)

    def abort(self, request_id: str, index: int | None = None) -> None:
        self.actor.abort.remote(request_id, index)

    async def load(self) -> ReplicaLoad:
        return await self._call(self.actor.load)

    async def kv_snapshot(self) -> KvSnapshot:
        return await self._call(self.actor.kv_snapshot)

    async def alive(self) -> bool:
        try:
            await self._call(self.actor.num_restarts)
        except ReplicaGone:
            return False
        except ReplicaUnreachable:
            return True  # unknown: not known dead
        return True

    async def _call(self, method):
        try:
            return await method.remote()
        except ray.exceptions.ActorUnavailableError as exc:
            raise ReplicaUnreachable(f"replica {self.replica_id} is unreachable: {cause(exc)}") from exc
        except ray.exceptions.ActorDiedError as exc:
            raise ReplicaGone(f"replica {self.replica_id} is dead: {cause(exc)}") from exc


class RayReplicaStream:
    """A Ray streaming call of ``ReplicaActor.generate``."""

    def __init__(self, handle: RayReplicaHandle, request_id: str, stream) -> None:
        self._handle, self._request_id, self._stream = handle, request_id, stream
        self._done = False

    def __aiter__(self) -> RayReplicaStream:
        return self

    async def __anext__(self) -> CompletionDelta:
        rid = self._handle.replica_id
        try:
            return await (await self._stream.__anext__())
        except StopAsyncIteration:
            self._done = True
            raise
        except ValueError as exc:  # the replica's own check (a RayTaskError that is a ValueError)
            self._done = True
            raise ReplicaRejected(cause(exc)) from exc
        except ray.exceptions.ActorUnavailableError as exc:
            # Unreachable for now (e.g. a network blip), may come back, and the call may or
            # may not have run: not dead; the close aborts in case it did run.
            raise ReplicaUnreachable(f"replica {rid} is unavailable: {cause(exc)}") from exc
        except ray.exceptions.RayActorError as exc:  # the actor died
            self._done = True
            raise ReplicaGone(f"replica {rid} is unavailable: {cause(exc)}") from exc
        except ray.exceptions.TaskCancelledError as exc:
            raise StreamCancelled("the request was cancelled") from exc
        except ray.exceptions.RayTaskError as exc:
            self._done = True
            raise ReplicaFailed(f"replica {rid} failed: {cause(exc)}") from exc

    def cancel(self) -> None:
        ray.cancel(self._stream)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            # NOTE: both: cancelling ends the Ray call; the explicit abort frees the blocks
            # before the engine's next step even if the actor's generator is slow to close.
            ray.cancel(self._stream)
            self._handle.abort(self._request_id)


def cause(exc: BaseException) -> str:
    """The innermost message of a Ray error (it wraps the replica's own in layers)."""
    inner = getattr(exc, "cause", None) or exc
    text = str(inner).strip()
    return text.splitlines()[-1] if text else type(inner).__name__
