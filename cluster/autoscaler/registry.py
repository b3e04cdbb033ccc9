"""Autoscaling policies, registered by name and built from the autoscale config.

A policy is pure: ``decide(observation, state)`` returns a ``Decision`` (the target and the
state for its next call) and touches nothing else; ``initial_state()`` is the state of its
first call. Stateless policies use None. The caller (the control loop, the fleet simulator)
owns the state between calls, so a policy can be replayed, tested and restarted.

``make_policy("scheduled + reactive + predictive", config)`` combines registered policies by
the rule in combined.py; a single name builds that policy alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from kvtide.cluster.autoscaler.observation import Decision, Observation

if TYPE_CHECKING:
    from kvtide.cluster.autoscaler.config import AutoscaleConfig


class Policy(Protocol):
    name: str

    def initial_state(self) -> Any: ...

    def decide(self, obs: Observation, state: Any) -> Decision: ...


PolicyFactory = Callable[["AutoscaleConfig"], Policy]

_POLICIES: dict[str, PolicyFactory] = {}


def register_policy(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    def add(factory: PolicyFactory) -> PolicyFactory:
        if name in _POLICIES:
            raise ValueError(f"autoscaling policy {name!r} is already registered")
        _POLICIES[name] = factory
        return factory

    return add


def policy_names() -> list[str]:
    _load_builtins()
    return sorted(_POLICIES)


def parse_policy_spec(spec: str) -> tuple[str, ...]:
    """``"scheduled + reactive"`` -> ("scheduled", "reactive"); every name must be registered."""
    names = tuple(part.strip() for part in spec.split("+"))
    known = policy_names()
    for name in names:
        if name not in known:
            raise ValueError(f"unknown autoscaling policy {name!r} in {spec!r}; known policies: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"autoscaling policy {spec!r} names a policy twice")
    return names


def make_policy(spec: str, config: AutoscaleConfig) -> Policy:
    names = parse_policy_spec(spec)
    if len(names) == 1:
        return _POLICIES[names[0]](config)
    from kvtide.cluster.autoscaler.combined import CombinedPolicy

    return CombinedPolicy(names, config)


def _load_builtins() -> None:
    # The built-in policies register themselves when their modules are imported.
    from kvtide.cluster.autoscaler import predictive, reactive, scheduled, static  # noqa: F401
