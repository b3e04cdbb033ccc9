"""What ``Server.start`` settles before and while the replicas start: the engine's device for
this Ray cluster, the request limits every replica reports, and a replica's start-up failure
as one line."""

from __future__ import annotations

import dataclasses
import logging

import ray

from kvtide.cluster.serve_config import ServeConfig, StartupError
from kvtide.router import ReplicaRegistration
from kvtide.workers import EngineConfig, RequestLimits

logger = logging.getLogger(__name__)


def engine_for_cluster(cfg: ServeConfig) -> EngineConfig:
    """The engine config with ``device="auto"`` settled by the Ray cluster (GPUs if it has
    any: the replica actors and this process hold none). A GPU replica that cannot get its
    GPUs is refused now, not after a placement timeout, on the private cluster this server
    starts; on a joined one (``--address``) Ray's autoscaler may still add GPU nodes for the
    shards' placement groups, so it waits for them (within ``replica_start_timeout_s``)."""
    engine, gpus = cfg.engine, int(ray.cluster_resources().get("GPU", 0))
    device = engine.model.device
    if device == "auto":
        device = "cuda" if gpus else "cpu"
        engine = dataclasses.replace(engine, model=dataclasses.replace(engine.model, device=device))
    need = cfg.tp * cfg.pp
    if device == "cuda" and gpus < need and cfg.address is not None:
        logger.warning("a replica needs %d GPU(s) and the Ray cluster has %d now: waiting up to %g s for "
                       "Ray's autoscaler to add GPU nodes", need, gpus, cfg.replica_start_timeout_s)  # fmt: skip
    elif device == "cuda" and gpus < need:
        raise StartupError(
            f"a replica needs {need} GPU(s) (tp={cfg.tp} x pp={cfg.pp}, --device {engine.model.device}) but the "
            f"Ray cluster has {gpus}; add GPU nodes, or serve on CPUs with --device cpu"
        )
    logger.info("replicas on %s: %d GPU(s) in the Ray cluster", device, gpus)
    return engine


def limits_of(registrations: dict[str, ReplicaRegistration]) -> RequestLimits:
    """The request limits every replica reported (they share one configuration)."""
    limits = {
        rid: RequestLimits(r.max_model_len, r.vocab_size, r.max_num_seqs, r.num_blocks, r.block_size)
        for rid, r in registrations.items()
    }
    distinct = set(limits.values())
    if len(distinct) != 1:
        raise StartupError(f"the replicas report different request limits: {limits}")
    return distinct.pop()


def root_cause(exc: BaseException) -> str:
    """The innermost error's text: Ray wraps a replica's constructor error in two layers."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    while cause is not None and (getattr(cause, "cause", None) or cause.__cause__) is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    return str(cause or exc).strip().splitlines()[-1]
