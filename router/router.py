"""The router: which replica serves a prompt, from what the replicas hold and how busy they are.

The frontend feeds it (registrations, load reports, KV events, snapshots on a gap) and asks
it ``choose()`` per request. It never does I/O; ``kvtide.cluster.frontend.cluster_state`` is the
shell that reads Redis and calls these methods.

A replica is in exact mode while its KV events arrive in order: ``apply_events`` gets every
event once, ids 0, 1, 2, ... (or from a snapshot's ``last_event_id + 1`` after ``resync``),
and has been called within ``sync_timeout_s`` (an empty list is the feeder saying "I looked
and there is nothing new"). Otherwise it is approximate: it keeps the last exact state and
adds the router's own decisions with an expiry. A gap (an event id past the next expected)
leaves the replica approximate until ``resync``.

Not thread-safe: call it from one thread (the frontend's event loop).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from kvtide.proto.block_hash import HASH_VERSION, BlockHash, hash_full_blocks
from kvtide.proto.kv_events import (
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    KvEvent,
)
from kvtide.router.cost import CostInputs, CostWeights, OutputLengthEstimator
from kvtide.router.policies import Candidate, PolicyOptions, make_policy
from kvtide.router.prefix_index import PrefixIndex
from kvtide.router.types import (
    NoReplicaError,
    ReplicaLoad,
    ReplicaRegistration,
    ReplicaRouteStatus,
    RouteDecision,
    RouterStatus,
    RoutingMode,
)

_MEAN_PREFILL_ALPHA = 0.05
"""Weight of the newest decision in the mean new-prefill length (about the last 20 count)."""


@dataclass
class _Replica:
    registration: ReplicaRegistration
    load: ReplicaLoad
    next_event_id: int | None = None
    """The id the next applied event must have; None until synced (from event 0 or a
    snapshot) and again after a gap."""
    last_sync_at: float = float("-inf")
    in_flight: int = 0
    """Requests this router sent there that have not finished."""


class Router:
    def __init__(
        self,
        policy: str = "kv_aware",
        *,
        block_size: int,
        hash_seed: bytes = b"",
        temperature: float = 0.02,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        weights: CostWeights | None = None,
        approx_ttl_s: float = 120.0,
        sync_timeout_s: float = 3.0,
        osl: OutputLengthEstimator | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if not temperature >= 0:  # NaN fails too
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not (approx_ttl_s > 0 and sync_timeout_s > 0):
            raise ValueError(
                f"approx_ttl_s and sync_timeout_s must be positive, got {approx_ttl_s} and {sync_timeout_s}"
            )
        self.policy_name = policy
        self._policy = make_policy(policy, PolicyOptions(temperature, weights or CostWeights()))
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.approx_ttl_s = approx_ttl_s
        self.sync_timeout_s = sync_timeout_s
        self._clock = clock
        self._rng = random.Random(seed)
        self._osl = osl or OutputLengthEstimator()
        self._index = PrefixIndex()
        self._replicas: dict[str, _Replica] = {}
        self._mean_prefill_tokens: float | None = None
        """Running mean (EMA) of the new prefill tokens of this router's decisions."""

    # ---- membership --------------------------------------------------------------------

    def register(self, reg: ReplicaRegistration) -> None:
        """Add a replica, or refresh it (idempotent for an identical registration).

        A changed registration (a restart: new incarnation, another cache size) starts the
        replica over: empty index, not synced. Raises ValueError when the replica hashes
        blocks differently from this router: its events could never match a prompt.
        """
        for field, theirs, ours in (
            ("block_size", reg.block_size, self.block_size),
            ("hash_seed", reg.hash_seed, self.hash_seed),
            ("hash_version", reg.hash_version, HASH_VERSION),
        ):
            if theirs != ours:
                raise ValueError(
                    f"replica {reg.replica_id!r} registered {field}={theirs!r} but this router "
                    f"uses {field}={ours!r}; their block hashes would never match"
                )
        if reg.num_blocks <= 0:
            raise ValueError(f"replica {reg.replica_id!r} registered num_blocks={reg.num_blocks}; must be positive")
        current = self._replicas.get(reg.replica_id)
        if current is not None:
            if current.registration == reg:
                return
            self.unregister(reg.replica_id)
        self._replicas[reg.replica_id] = _Replica(reg, ReplicaLoad(0, 0, reg.num_blocks, reg.num_blocks, 0.0))
        self._index.add_replica(reg.replica_id, reg.num_blocks)

    def unregister(self, replica_id: str) -> None:
        """Forget a replica (idempotent): it receives no more requests."""
        if self._replicas.pop(replica_id, None) is not None:
            self._index.remove_replica(replica_id)

    def replica_ids(self) -> list[str]:
        return sorted(self._replicas)

    def registration(self, replica_id: str) -> ReplicaRegistration:
        return self._get(replica_id).registration

    # ---- feeding -----------------------------------------------------------------------

    def update_load(self, replica_id: str, load: ReplicaLoad) -> None:
        self._get(replica_id).load = load

    def apply_events(self, replica_id: str, events: Sequence[KvEvent]) -> bool:
        """Apply the replica's next KV events, oldest first; False when a gap was seen.

        Events older than the next expected id are skipped (already in a snapshot). On a
        gap nothing from the gap on is applied and the replica stays approximate until
        ``resync``; the caller must fetch a snapshot.
        """
        r = self._get(replica_id)
        for event in events:
            expected = r.next_event_id
            if expected is None:
                if event.event_id != 0:
                    return False
                expected = 0
                self._index.clear_approximate(replica_id)
            if event.event_id < expected:
                continue
            if event.event_id > expected:
                r.next_event_id = None
                return False
            self._apply(replica_id, event)
            r.next_event_id = expected + 1
        if r.next_event_id is not None:
            r.last_sync_at = self._clock()
        return r.next_event_id is not None or not events

    def resync(self, replica_id: str, last_event_id: int, block_hashes: Iterable[BlockHash]) -> None:
        """Replace what the router knows of the replica's cache with a snapshot.

        ``block_hashes`` is the cache after event ``last_event_id`` (-1: no event yet) or
        later: events after ``last_event_id`` are still applied when they arrive (see the
        NOTE in ``prefix_index``).
        """
        r = self._get(replica_id)
        self._index.replace(replica_id, block_hashes)
        self._index.clear_approximate(replica_id)
        r.next_event_id = last_event_id + 1
        r.last_sync_at = self._clock()

    def mark_unsynced(self, replica_id: str) -> None:
        """Distrust the replica's event stream until the next ``resync`` (e.g. the store lost
        events while it was down)."""
        self._get(replica_id).next_event_id = None

    def on_request_finished(self, replica_id: str, num_prompt_tokens: int, num_output_tokens: int) -> None:
        """Count the output length for the OSL estimate and end the request's in-flight slot."""
        self._osl.observe(num_output_tokens)
        self.on_request_ended(replica_id)

    def on_request_ended(self, replica_id: str) -> None:
        """End the request's in-flight slot without counting its output length: it was
        cancelled, timed out or failed, so its length says nothing about OSL."""
        r = self._replicas.get(replica_id)
        if r is not None:
            r.in_flight = max(0, r.in_flight - 1)

    # ---- routing -----------------------------------------------------------------------

    def mode(self, replica_id: str) -> RoutingMode:
        return self._mode(self._get(replica_id), self._clock())

    def choose(
        self,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        exclude: Collection[str] = (),
    ) -> RouteDecision:
        """Pick the replica for a request and count it in flight there (until
        ``on_request_finished``). Raises ``NoReplicaError`` when every replica is excluded
        or none is registered."""
        ids = [rid for rid in sorted(self._replicas) if rid not in exclude]
        if not ids:
            raise NoReplicaError(
                f"no replica to route to: {len(self._replicas)} registered, "
                f"{len(set(exclude) & set(self._replicas))} of them excluded"
            )
        now = self._clock()
        num_prompt = len(prompt_token_ids)
        hashes = hash_full_blocks(prompt_token_ids, self.block_size, seed=self.hash_seed)
        # The engine always computes the block holding the last prompt token (for its logits).
        reusable = hashes[: max(0, num_prompt - 1) // self.block_size]
        modes = {rid: self._mode(self._replicas[rid], now) for rid in ids}
        approximate = {rid for rid, m in modes.items() if m is RoutingMode.APPROXIMATE}
        matched = self._index.match(reusable, ids, approximate, now)
        num_output = self._osl.expected(max_tokens)
        if self._mean_prefill_tokens is None:
            self._mean_prefill_tokens = float(num_prompt)
        candidates = [
            self._candidate(rid, matched[rid], num_prompt, num_output, modes[rid], now) for rid in ids
        ]
        choice = self._policy.choose(candidates, self._rng)
        chosen = candidates[choice.index]
        self._mean_prefill_tokens += _MEAN_PREFILL_ALPHA * (
            chosen.inputs.num_new_prefill_tokens - self._mean_prefill_tokens
        )
        self._replicas[chosen.replica_id].in_flight += 1
        if chosen.mode is RoutingMode.APPROXIMATE and hashes:
            self._index.record(chosen.replica_id, hashes, now + self.approx_ttl_s, now)
        return RouteDecision(chosen.replica_id, chosen.cached_blocks, choice.cost, chosen.mode.value)

    def status(self) -> RouterStatus:
        """For the status API and metrics: per replica its mode, load, in-flight count and
        indexed blocks; the policy; the OSL estimate."""
        now = self._clock()
        replicas = tuple(
            ReplicaRouteStatus(
                replica_id=rid, mode=self._mode(r, now), model=r.registration.model, load=r.load,
                in_flight=r.in_flight, blocks_indexed=self._index.num_exact(rid),
                blocks_guessed=self._index.num_approximate(rid, now), next_event_id=r.next_event_id,
            )  # fmt: skip
            for rid, r in sorted(self._replicas.items())
        )
        return RouterStatus(self.policy_name, self.block_size, self._osl.observed_quantile(), replicas)

    # ---- internals ---------------------------------------------------------------------

    def _get(self, replica_id: str) -> _Replica:
        r = self._replicas.get(replica_id)
        if r is None:
            raise KeyError(f"replica {replica_id!r} is not registered; registered: {sorted(self._replicas)}")
        return r

    def _mode(self, r: _Replica, now: float) -> RoutingMode:
        fresh = now - r.last_sync_at <= self.sync_timeout_s
        return RoutingMode.EXACT if r.next_event_id is not None and fresh else RoutingMode.APPROXIMATE

    def _apply(self, replica_id: str, event: KvEvent) -> None:
        match event:
            case BlocksStored(block_hashes=hashes):
                self._index.store(replica_id, hashes)
            case BlocksRemoved(block_hashes=hashes):
                self._index.remove(replica_id, hashes)
            case AllBlocksCleared():
                self._index.clear(replica_id)

    def _candidate(
        self, rid: str, cached_blocks: int, num_prompt: int, num_output: int, mode: RoutingMode, now: float
    ) -> Candidate:
        r = self._replicas[rid]
        num_cached = self._index.num_exact(rid)
        if mode is RoutingMode.APPROXIMATE:
            num_cached += self._index.num_approximate(rid, now)
        load = r.load
        # The load report lags; requests sent since are queued there as far as we know.
        num_requests = max(load.num_running + load.num_waiting, r.in_flight)
        num_running = min(load.num_running, num_requests)
        unreported = num_requests - load.num_running - load.num_waiting
        inputs = CostInputs(
            num_prompt_tokens=num_prompt,
            num_cached_tokens=cached_blocks * self.block_size,
            num_expected_output_tokens=num_output,
            block_size=self.block_size,
            num_running=num_running,
            num_waiting=num_requests - num_running,
            num_free_blocks=load.num_free_blocks,
            num_empty_blocks=max(0, r.registration.num_blocks - num_cached),
            queued_prefill_tokens=load.num_pending_prefill_tokens + unreported * (self._mean_prefill_tokens or 0.0),
        )
        return Candidate(rid, cached_blocks, inputs, mode)
