"""kvtide.router: pure routing logic (prefix index, cost, policies); no Ray, no gRPC."""

from kvtide.router.cost import (
    CostInputs,
    CostWeights,
    OutputLengthEstimator,
    cost,
    softmin_choice,
)
from kvtide.router.policies import policy_names, register_policy
from kvtide.router.prefix_index import PrefixIndex
from kvtide.router.router import Router
from kvtide.router.types import (
    NoReplicaError,
    ReplicaId,
    ReplicaLoad,
    ReplicaRegistration,
    ReplicaRouteStatus,
    RouteDecision,
    RouterStatus,
    RoutingMode,
)

__all__ = [
    "CostInputs",
    "CostWeights",
    "NoReplicaError",
    "OutputLengthEstimator",
    "PrefixIndex",
    "ReplicaId",
    "ReplicaLoad",
    "ReplicaRegistration",
    "ReplicaRouteStatus",
    "RouteDecision",
    "RouterStatus",
    "Router",
    "RoutingMode",
    "cost",
    "policy_names",
    "register_policy",
    "softmin_choice",
]
