"""The replicas a frontend sends to: their handles, and the routing seam in front of them.

``ReplicaSet`` asks the router (fed by ``ClusterState``) which replica serves a request, and
hands every notice about a replica (finished, ended, found dead) to the one owner of it:
the router for in-flight counts, ``ClusterState`` for liveness. Without a cluster state
(tests, a single replica) it falls back to round-robin.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from kvtide.cluster.frontend.cluster_state import ClusterState
from kvtide.cluster.frontend.handles import ReplicaHandle
from kvtide.router import NoReplicaError, ReplicaId, RouterStatus


class NoReplicaAvailable(Exception):
    """No replica can take the request (none registered, or all excluded)."""


@dataclass(frozen=True)
class RoutedReplica:
    replica_id: ReplicaId
    handle: ReplicaHandle


class ReplicaSet:
    def __init__(self, handles: Mapping[str, ReplicaHandle], state: ClusterState | None = None) -> None:
        self.handles = {ReplicaId(k): v for k, v in handles.items()}
        self.state = state
        self._next = itertools.cycle(sorted(self.handles))

    def choose(self, prompt_token_ids: Sequence[int], max_tokens: int, exclude: Collection[str] = ()) -> RoutedReplica:
        """Raises ``NoReplicaAvailable``."""
        if not set(self.handles) - set(exclude):
            raise NoReplicaAvailable("no replica is serving" if not self.handles else f"every replica is excluded: {sorted(exclude)}")
        if self.state is None:
            rid = next(self._next)
            while rid in exclude:
                rid = next(self._next)
        else:
            try:
                rid = ReplicaId(self.state.router.choose(prompt_token_ids, max_tokens, exclude).replica_id)
            except NoReplicaError as exc:
                raise NoReplicaAvailable(str(exc)) from exc
        handle = self.handles.get(rid)
        if handle is None:
            raise NoReplicaAvailable(f"the router chose replica {rid!r}, which this frontend does not know")
        return RoutedReplica(rid, handle)

    def on_finished(self, replica_id: str, num_prompt_tokens: int, num_output_tokens: int) -> None:
        if self.state is not None and replica_id in self.state.router.replica_ids():
            self.state.router.on_request_finished(replica_id, num_prompt_tokens, num_output_tokens)

    def on_ended(self, replica_id: str) -> None:
        """A routed request ended without finishing (cancelled, timed out, failed)."""
        if self.state is not None and replica_id in self.state.router.replica_ids():
            self.state.router.on_request_ended(replica_id)

    def replica_failed(self, replica_id: str) -> None:
        """A request found the replica dead."""
        if self.state is not None:
            self.state.replica_failed(replica_id)

    def routing_status(self) -> RouterStatus | None:
        return self.state.router.status() if self.state is not None else None
