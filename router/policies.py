"""Routing policies, registered by name: ``kv_aware`` (the default), ``round_robin``,
``least_loaded``.

A policy sees one ``Candidate`` per replica it may use (never empty) and returns the index
of its choice and that choice's cost. Policies may keep state between calls (round-robin's
position); the router calls them from one thread.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from kvtide.router.cost import CostInputs, CostWeights, cost, softmin_choice
from kvtide.router.types import RoutingMode


@dataclass(frozen=True)
class Candidate:
    replica_id: str
    cached_blocks: int
    inputs: CostInputs
    """The request on this replica; ``num_running``/``num_waiting`` include requests this router
    sent that the replica's last load report does not show yet."""
    mode: RoutingMode


class Choice(NamedTuple):
    index: int
    cost: float


class Policy(Protocol):
    def choose(self, candidates: Sequence[Candidate], rng: random.Random) -> Choice: ...


@dataclass(frozen=True)
class PolicyOptions:
    temperature: float = 0.02
    weights: CostWeights = field(default_factory=CostWeights)


_POLICIES: dict[str, Callable[[PolicyOptions], Policy]] = {}


def register_policy(name: str) -> Callable[[Callable[[PolicyOptions], Policy]], Callable[[PolicyOptions], Policy]]:
    def add(factory: Callable[[PolicyOptions], Policy]) -> Callable[[PolicyOptions], Policy]:
        if name in _POLICIES:
            raise ValueError(f"routing policy {name!r} is already registered")
        _POLICIES[name] = factory
        return factory

    return add


def policy_names() -> list[str]:
    return sorted(_POLICIES)


def make_policy(name: str, options: PolicyOptions | None = None) -> Policy:
    factory = _POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown routing policy {name!r}; known policies: {', '.join(policy_names())}")
    return factory(options or PolicyOptions())


@register_policy("kv_aware")
class KvAwarePolicy:
    """Lowest ``cost()`` wins, sampled with a temperature (``softmin_choice``)."""

    def __init__(self, options: PolicyOptions) -> None:
        self.options = options

    def choose(self, candidates: Sequence[Candidate], rng: random.Random) -> Choice:
        costs = [cost(c.inputs, self.options.weights) for c in candidates]
        i = softmin_choice(costs, self.options.temperature, rng)
        return Choice(i, costs[i])


@register_policy("round_robin")
class RoundRobinPolicy:
    """The next replica id after the last one chosen, in sorted order: fair while replicas
    come and go or are excluded, and blind to caches and load."""

    def __init__(self, options: PolicyOptions) -> None:
        self._last: str | None = None

    def choose(self, candidates: Sequence[Candidate], rng: random.Random) -> Choice:
        order = sorted(range(len(candidates)), key=lambda i: candidates[i].replica_id)
        after = [i for i in order if self._last is None or candidates[i].replica_id > self._last]
        i = after[0] if after else order[0]
        self._last = candidates[i].replica_id
        return Choice(i, 0.0)


@register_policy("least_loaded")
class LeastLoadedPolicy:
    """Fewest running + waiting requests, then most free KV blocks; ties at random."""

    def __init__(self, options: PolicyOptions) -> None:
        pass

    def choose(self, candidates: Sequence[Candidate], rng: random.Random) -> Choice:
        def key(c: Candidate) -> tuple[int, int]:
            return (c.inputs.num_running + c.inputs.num_waiting, -c.inputs.num_free_blocks)

        best = min(key(c) for c in candidates)
        tied = [i for i, c in enumerate(candidates) if key(c) == best]
        i = tied[rng.randrange(len(tied))]
        return Choice(i, float(best[0]))
