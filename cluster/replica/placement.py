"""Where a replica's shards run: one Ray placement group per pipeline stage.

A stage's tensor-parallel ranks all-reduce every layer, so they must share a node: each stage
is a ``STRICT_PACK`` group of ``tp`` bundles. Stages only pass one hidden state per step to
the next, so they may sit on different nodes, and should: spreading them is what lets a
model larger than one node be served at all.

Ray has no "STRICT_PACK inside, SPREAD across" strategy for one group, so each stage gets its
own group, created with ``_soft_target_node_id`` (Ray >= 2.9; honoured for STRICT_PACK only):
stage ``s`` targets a node that no earlier stage of this replica targeted and that has room
now, chosen from Ray's per-node free resources. The hint is soft: when the target is full
Ray packs the stage elsewhere (possibly beside another stage) instead of failing, so a
small cluster still serves. A hard per-node constraint (a node-id label selector) was the
alternative; it would turn a busy node into a placement failure.

Ray frees a placement group when the job *and* the actor that created it are both gone. The
replica actor creates its shards' groups, so a replica that dies while its frontend keeps
running would hold its CPUs/GPUs until the frontend exits. Groups are therefore named
``{owner}/stage{s}`` after a name the frontend chooses, and ``remove_groups(owner)`` frees
a dead replica's groups from outside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray._raylet import PlacementGroupID
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class PlacementError(RuntimeError):
    """A replica's shards could not be placed on the cluster."""


@dataclass(frozen=True)
class ReplicaShape:
    """The parallel layout of one replica: ``tp`` shards per stage, ``pp`` stages."""

    tp: int
    pp: int
    use_gpu: bool = False
    cpus_per_shard: float = 1.0
    """CPUs reserved for each shard when ``use_gpu`` is false."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.cpus_per_shard > 0:
            raise ValueError(f"cpus_per_shard must be > 0, got {self.cpus_per_shard}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def bundle(self) -> dict[str, float]:
        """Resources of one shard."""
        return {"GPU": 1.0} if self.use_gpu else {"CPU": float(self.cpus_per_shard)}

    @property
    def actor_options(self) -> dict[str, float]:
        """``.options()`` resources of one shard's actor, matching its bundle."""
        if self.use_gpu:
            return {"num_cpus": 0, "num_gpus": 1}
        return {"num_cpus": self.cpus_per_shard, "num_gpus": 0}


@dataclass(frozen=True)
class ReplicaPlacement:
    shape: ReplicaShape
    groups: tuple[PlacementGroup, ...]
    """One ready placement group per stage; bundle ``i`` is TP rank ``i``."""
    stage_nodes: tuple[str, ...]
    """Hex node id that holds each stage."""

    def scheduling_strategy(self, stage: int, tp_rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(
            placement_group=self.groups[stage],
            placement_group_bundle_index=tp_rank,
            placement_group_capture_child_tasks=False,
        )

    def remove(self) -> None:
        """Free every group (idempotent; actors inside them are killed by Ray)."""
        for group in self.groups:
            remove_quietly(group)


WAITING_AFTER_S = 2.0
"""A placement not ready this soon waits for resources (``on_waiting`` hears it)."""


def place_replica(
    shape: ReplicaShape, timeout_s: float, owner: str = "", on_waiting: Callable[[], None] | None = None
) -> ReplicaPlacement:
    """Reserve the replica's resources; raises ``PlacementError`` naming what did not fit.
    ``owner`` names the groups (``{owner}/stage{s}``) so ``remove_groups(owner)`` finds them;
    ``on_waiting`` is called once if they are not placed within ``WAITING_AFTER_S``."""
    targets = _target_nodes(shape)
    groups = tuple(
        placement_group(
            [shape.bundle] * shape.tp,
            strategy="STRICT_PACK",
            name=f"{owner}/stage{stage}" if owner else "",
            _soft_target_node_id=target,
        )
        for stage, target in enumerate(targets)
    )
    refs = [g.ready() for g in groups]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=min(WAITING_AFTER_S, timeout_s))
    if len(ready) < len(refs):
        if on_waiting is not None:
            on_waiting()
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, timeout_s - WAITING_AFTER_S))
    if len(ready) < len(refs):
        missing = [stage for stage, ref in enumerate(refs) if ref not in ready]
        for group in groups:
            remove_quietly(group)
        raise PlacementError(
            f"could not place pipeline stage(s) {missing} of a tp={shape.tp} x pp={shape.pp} replica "
            f"within {timeout_s} s: each stage needs {shape.tp} x {shape.bundle} on one node; "
            f"free per node now: {_free_by_node()}"
        )
    nodes = tuple(ray.util.placement_group_table(g)["bundles_to_node_id"][0] for g in groups)
    return ReplicaPlacement(shape, groups, nodes)


def _target_nodes(shape: ReplicaShape) -> list[str]:
    """A node per stage: one that could ever hold the stage, unused by earlier stages and
    with room now where possible. Fails fast when no node could ever hold a stage."""
    need = {k: v * shape.tp for k, v in shape.bundle.items()}
    totals = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    candidates = [node for node, res in totals.items() if _fits(need, res)]
    if not candidates:
        largest = {k: max((r.get(k, 0.0) for r in totals.values()), default=0.0) for k in need}
        raise PlacementError(
            f"no node can hold one pipeline stage of a tp={shape.tp} replica: a stage needs {need} "
            f"on one node, the largest node has {largest}"
        )
    free = {node: dict(_free_by_node().get(node, {})) for node in candidates}
    key = next(iter(need))  # GPU or CPU: rank by how many are free
    targets: list[str] = []
    for _ in range(shape.pp):
        target = min(
            candidates,
            key=lambda n: (n in targets, not _fits(need, free[n]), -free[n].get(key, 0.0), n),
        )
        for k, v in need.items():
            free[target][k] = free[target].get(k, 0.0) - v
        targets.append(target)
    return targets


def _fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(k, 0.0) >= v for k, v in need.items())


def _free_by_node() -> dict[str, dict[str, float]]:
    # NOTE: private Ray API (also used by vLLM); only a ranking hint, so losing it is safe.
    try:
        return ray._private.state.available_resources_per_node()
    except AttributeError:
        return {}


def remove_groups(owner: str) -> int:
    """Free every live group named ``{owner}/...``; returns how many. ``owner`` may be a
    path prefix shared by several replicas (``kvtide-1a2b`` frees ``kvtide-1a2b/replica-0/...``
    and ``kvtide-1a2b/replica-1/...``). Safe on groups their replica already freed."""
    if not owner:
        raise ValueError("owner must be non-empty: an empty prefix would match every group")
    removed = 0
    for group_id, info in placement_group_table().items():
        if info.get("name", "").startswith(owner + "/") and info.get("state") != "REMOVED":
            remove_quietly(PlacementGroup(PlacementGroupID(bytes.fromhex(group_id))))
            removed += 1
    return removed


def remove_quietly(group: PlacementGroup) -> None:
    try:
        remove_placement_group(group)
    except Exception:  # already removed, or the cluster is gone
        pass
