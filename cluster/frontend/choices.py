"""One request's choices as the gateway follows them: each choice's text and tokens (its
``IncrementalDetokenizer`` is the one place text is made and stop strings are found), and a
replica stream's failures sorted into those the request survives by moving (``ReplicaLost``)
and those it does not (``ServingError``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtide.cluster.frontend.errors import Code, ServingError, invalid
from kvtide.cluster.frontend.handles import (
    ReplicaFailed,
    ReplicaGone,
    ReplicaRejected,
    ReplicaStream,
    ReplicaUnreachable,
    StreamCancelled,
)
from kvtide.cluster.frontend.replicas import ReplicaSet, RoutedReplica
from kvtide.cluster.frontend.requests import ChoiceDelta
from kvtide.workers import IncrementalDetokenizer


@dataclass
class Active:
    """A request streaming from a replica (the one ``routed`` names now)."""

    routed: RoutedReplica
    stream: ReplicaStream | None = None
    abort_reason: str | None = None
    finished: bool = False
    """Every choice finished and the router was told (``on_finished``)."""
    outcome: str = "abort"
    """The finish reason counted if it does not finish: "abort" (cancelled, timed out,
    drained) unless the replica failed it ("error")."""


@dataclass
class Choice:
    """One choice's text and tokens, as the client sees them."""

    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take(self, d) -> ChoiceDelta:
        pushed_before = self.detok.num_tokens_pushed
        released = self.detok.push(d.token_ids, final=d.finished)
        ids, finish, stop = d.token_ids, d.finish_reason, d.stop_reason
        if released.stop_string is not None:  # the stop string ends it here, whatever the engine said
            ids = ids[: self.detok.num_tokens_to_stop - pushed_before]
            finish, stop = "stop", released.stop_string
        self.token_ids.extend(ids)
        self.finish_reason = finish
        return ChoiceDelta(d.index, tuple(ids), released.text, d.logprobs[: len(ids)], finish, stop, "")


class ReplicaLost(Exception):
    """The replica serving a request died, cannot be reached, or failed its step: the request
    may move to another (``Gateway._migrate``)."""

    def __init__(self, message: str, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone
        """The replica's process is dead (it cannot take the request again)."""


async def mapped(stream: ReplicaStream, routed: RoutedReplica, active: Active, replicas: ReplicaSet):
    """The replica's deltas; its errors as ServingErrors, or ``ReplicaLost`` when the request
    may move to another replica."""
    rid = routed.replica_id
    try:
        async for d in stream:
            yield d
    except ReplicaRejected as exc:
        active.outcome = "error"
        raise invalid(str(exc)) from exc
    except ReplicaUnreachable as exc:  # not dead: keep routing to it
        raise ReplicaLost(str(exc)) from exc
    except ReplicaGone as exc:
        replicas.replica_failed(rid)
        raise ReplicaLost(str(exc), gone=True) from exc
    except StreamCancelled as exc:
        raise ServingError(Code.UNAVAILABLE, active.abort_reason or str(exc)) from exc
    except ReplicaFailed as exc:
        raise ReplicaLost(str(exc)) from exc
