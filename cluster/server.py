"""``Server``: Ray, N replicas, Redis, the router and both frontends, started and stopped as one.

``start()`` resolves the engine configuration once (the frontend keeps its request limits and
the one tokenizer; the replicas get the resolved config), joins a Ray cluster (``--address``)
or starts a private one on loopback, starts the replicas and waits until each has run a real
step, starts Redis (an embedded ``redis-server`` unless a URL is given), feeds the router from
it (``ClusterState``), and serves gRPC and OpenAI HTTP. ``stop()`` drains: health turns
NOT_SERVING, new requests get UNAVAILABLE / 503, in-flight ones get ``drain_timeout_s`` to
finish and are then aborted with a reason that says so; then it stops everything it started,
in reverse order, and nothing it did not.

While serving, a ``Supervisor`` checks each replica's health (see ``supervisor.py``); a dead
replica is made anew under its id, its placement groups freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import uuid
from typing import Any

import ray

from kvtide.cluster.frontend.cluster_state import ClusterState
from kvtide.cluster.frontend.gateway import Gateway
from kvtide.cluster.frontend.grpc_server import GrpcServer, start_grpc_server
from kvtide.cluster.frontend.ray_handles import RayReplicaHandle
from kvtide.cluster.frontend.replicas import ReplicaSet
from kvtide.cluster.frontend.http_server import HttpServer
from kvtide.cluster.replica.actor import ReplicaActor, stop_replica
from kvtide.cluster.replica.logs import ray_logs_hint
from kvtide.cluster.replica.placement import remove_groups
from kvtide.cluster.replica.spec import ReplicaSpec
from kvtide.cluster.serve_config import ServeConfig, StartupError
from kvtide.cluster.server_replicas import ReplicaChanges
from kvtide.cluster.startup import engine_for_cluster, limits_of, root_cause
from kvtide.cluster.state.store import StateStore
from kvtide.cluster.supervisor import Supervisor
from kvtide.router import ReplicaRegistration, Router
from kvtide.workers import ResolvedConfig, Tokenizer, resolve_engine

logger = logging.getLogger(__name__)

HEALTH_PROBE_TIMEOUT_S = 60.0
"""One 1-token step through every shard, once they reported ready (loaded and built)."""


class Server(ReplicaChanges):
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.gateway: Gateway | None = None
        self.grpc: GrpcServer | None = None
        self.http: HttpServer | None = None
        self.redis_url: str | None = None
        self._actors: dict[str, Any] = {}
        self._started_ray = False
        self._redis = None
        self._tasks: list[asyncio.Task] = []
        self._state: ClusterState | None = None
        self._resolved: ResolvedConfig | None = None
        self._generation: dict[str, int] = {}
        """replica id -> how many times it was made (its placement groups are named by it)."""
        self._resolved_of: dict[str, ResolvedConfig] = {}
        """replica id -> its own engine config, for replicas the fleet added with a profile."""
        self.supervisor: Supervisor | None = None
        self.placement_owner = f"kvtide-{uuid.uuid4().hex[:12]}"
        """Prefix of every placement group this server's replicas create."""

    @property
    def grpc_port(self) -> int:
        return self.grpc.port if self.grpc else 0

    @property
    def http_port(self) -> int:
        return self.http.port if self.http else 0

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop(drain_timeout_s=0)
            raise

    async def _start(self) -> None:
        cfg = self.config
        self._init_ray()
        resolved = resolve_engine(engine_for_cluster(self.config))
        tokenizer = Tokenizer.from_dir(resolved.model_dir)
        registrations = await self._start_replicas(resolved)
        limits = limits_of(registrations)
        self._start_redis()
        state = await self._start_cluster_state(registrations)
        self.gateway = Gateway(cfg.model, limits, tokenizer, ReplicaSet(state.handles, state), cfg.frontend)
        cert, key = (p.read_bytes() if p else None for p in (cfg.tls_cert, cfg.tls_key))
        self.grpc = await start_grpc_server(self.gateway, cfg.host, cfg.grpc_port, cert, key)
        self.http = await HttpServer.start(self.gateway, cfg.host, cfg.http_port, cfg.tls_cert, cfg.tls_key,
                                           cfg.drain_timeout_s)  # fmt: skip
        self.supervisor = Supervisor(state, self._actors, self._recreate, self._set_serving, cfg.supervision)
        self.gateway.metrics.replica_health = self.supervisor.health
        self._tasks.append(asyncio.create_task(self.supervisor.run()))
        scheme = "https" if cert else "http"
        logger.info("gRPC (kvtide.v1.Kvtide, health, reflection) on %s:%d", cfg.host, self.grpc_port)
        logger.info("OpenAI HTTP API on %s://%s:%d/v1 (metrics on /metrics)", scheme, cfg.host, self.http_port)

    def _init_ray(self) -> None:
        cfg = self.config
        if ray.is_initialized():
            return  # the caller's Ray (tests, notebooks): theirs to stop
        if cfg.address is not None:
            ray.init(address=cfg.address)
            logger.info("joined the Ray cluster at %s", cfg.address)
        else:
            # Logical CPUs for placement only: each replica asks one per shard.
            num_cpus = max(os.cpu_count() or 1, cfg.num_replicas * cfg.tp * cfg.pp)
            # NOTE: address="local": a bare ray.init() would join someone else's cluster on this
            # machine. The private cluster stays on loopback whatever --host the API binds.
            # worker_niceness 0, not Ray's 15, or every daemon preempts the shards mid-step
            # (1.07x the tokens/s at one stream, bench/README.md "Serving at nice 0").
            info = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                            _node_ip_address="127.0.0.1", _system_config={"worker_niceness": 0})  # fmt: skip
            logger.info("started a local Ray cluster at %s", info.address_info.get("gcs_address"))
        self._started_ray = True

    async def _start_replicas(self, resolved: ResolvedConfig) -> dict[str, ReplicaRegistration]:
        self._resolved = resolved
        for i in range(self.config.num_replicas):
            self._actors[f"replica-{i}"] = self._new_actor(f"replica-{i}")
        registrations = {}
        for rid, actor in self._actors.items():
            await self._wait_ready(rid, actor)
            reg = registrations[rid] = await actor.registration.remote(rid)
            logger.info("%s ready: tp=%d pp=%d, %d KV blocks of %d tokens",
                        rid, reg.tp, reg.pp, reg.num_blocks, reg.block_size)  # fmt: skip
        return registrations

    def _new_actor(self, rid: str):
        cfg, gen = self.config, self._generation.get(rid, -1) + 1
        self._generation[rid] = gen
        spec = ReplicaSpec(self._resolved_of.get(rid, self._resolved), start_timeout_s=cfg.replica_start_timeout_s,
                           placement_owner=self._owner(rid, gen), model_name=cfg.model)  # fmt: skip
        return ReplicaActor.options(num_cpus=0).remote(spec)

    def _owner(self, rid: str, gen: int) -> str:
        return f"{self.placement_owner}/{rid}/g{gen}"

    async def _recreate(self, rid: str):
        """The supervisor's: a dead replica made anew under its id, ready, and back in the router."""
        old_gen, state = self._generation[rid], self._state
        await asyncio.to_thread(remove_groups, self._owner(rid, old_gen))
        actor = self._actors[rid] = self._new_actor(rid)
        state.handles[rid].actor = actor
        await self._wait_ready(rid, actor)
        if state.store is not None:
            await actor.start_publishing.remote(self.redis_url, rid)
        else:
            state.register(await actor.registration.remote(rid))
        return actor

    async def _set_serving(self, serving: bool) -> None:
        if self.gateway is not None:
            self.gateway.healthy = serving
        if self.grpc is not None and not self.gateway.draining:
            await self.grpc.set_serving(serving)

    async def _wait_ready(self, rid: str, actor) -> None:
        """The replica's start (its shards start within ``replica_start_timeout_s``, kernel
        builds included) and then one real step through every shard."""
        cfg = self.config
        timeout_s = cfg.replica_start_timeout_s + HEALTH_PROBE_TIMEOUT_S + 30.0
        try:
            ok = await asyncio.wait_for(actor.health.remote(HEALTH_PROBE_TIMEOUT_S), timeout_s)
        except asyncio.TimeoutError:
            raise StartupError(
                f"{rid} did not become ready within {timeout_s:g} s (loading {cfg.model} on "
                f"{cfg.tp * cfg.pp} shard(s), then one probe step); see {ray_logs_hint()}"
            ) from None
        except ray.exceptions.RayError as exc:
            raise StartupError(f"{rid} failed to start: {root_cause(exc)}") from exc
        if not ok:
            raise StartupError(f"{rid} started but its probe step did not finish; see {ray_logs_hint()}")

    async def _start_cluster_state(self, registrations: dict[str, ReplicaRegistration]) -> ClusterState:
        """``ClusterState`` feeds the router: from Redis when there is one (each replica
        publishes its registration, load and KV events there: exact routing), else from the
        registrations here and a load poll (approximate routing)."""
        cfg = self.config
        first = next(iter(registrations.values()))
        router = Router(cfg.routing_policy, block_size=first.block_size, hash_seed=first.hash_seed)
        store = StateStore(self.redis_url) if self.redis_url else None
        handles = {rid: RayReplicaHandle(rid, actor) for rid, actor in self._actors.items()}
        self._state = state = ClusterState(router, handles, store, load_interval_s=cfg.stats_interval_s)
        state.on_replica_lost = self._replica_lost
        for rid, actor in self._actors.items():
            if store is not None:
                await actor.start_publishing.remote(self.redis_url, rid)
            else:
                state.register(registrations[rid])
        state.start()
        await self._wait_registered(router)
        return state

    async def _wait_registered(self, router: Router, timeout_s: float = 60.0) -> None:
        """Every replica in the router; fails fast, naming the replica and why, when one cannot
        reach the state store (each publishes within a tick when it can)."""
        loop = asyncio.get_running_loop()
        deadline, next_check = loop.time() + timeout_s, loop.time() + 3.0
        while (missing := sorted(set(self._actors) - set(router.replica_ids()))):
            now = loop.time()
            if now > next_check and self._state.store is not None:
                next_check = now + 2.0
                for rid in missing:
                    stats = await asyncio.wait_for(self._actors[rid].publisher_stats.remote(), 10.0)
                    if stats.get("failed") and not stats.get("published"):
                        raise StartupError(
                            f"{rid} cannot reach the state store at {self._state.store.public_url}: {stats['last_error']}"
                        )
            if now > deadline:
                raise StartupError(f"replicas {missing} did not register with the router within {timeout_s:g} s")
            await asyncio.sleep(0.05)

    def _replica_lost(self, replica_id: str) -> None:
        """The replica left the router for good: free its shards' placement groups once Ray
        confirms the actor is gone (a live one keeps them)."""
        handle = RayReplicaHandle(replica_id, self._state.handles[replica_id].actor)
        owner = self._owner(replica_id, self._generation[replica_id])
        self._tasks.append(asyncio.create_task(self._free_if_dead(handle, owner)))

    async def _free_if_dead(self, handle: RayReplicaHandle, owner: str) -> None:
        """``handle`` and ``owner``: the actor that was lost, not one made anew since."""
        if await handle.alive():
            logger.info("%s left routing but is alive; its placement groups stay", handle.replica_id)
            return
        freed = await asyncio.to_thread(remove_groups, owner)
        logger.warning("%s is dead; freed its %d placement group(s)", handle.replica_id, freed)

    def _start_redis(self) -> None:
        """The embedded Redis (unless ``redis_url`` names one): on loopback for the private
        cluster this server started; on this node's cluster address, with a generated password,
        for a cluster other nodes have joined, so every replica reaches it."""
        url = self.config.redis_url
        if url is None:
            from kvtide.cluster.state.redis_server import start_redis

            if self._started_ray and self.config.address is None:
                host, password = "127.0.0.1", None
            else:
                host, password = ray.util.get_node_ip_address(), secrets.token_urlsafe(24)
            self._redis = start_redis(host, password=password)
            url = self._redis.url
            logger.info("embedded Redis on %s", self._redis.public_url)
        self.redis_url = url or None

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Drain, then stop everything this server started (idempotent)."""
        timeout_s = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self.grpc is not None:
            await self.grpc.set_serving(False)
        if self.gateway is not None:
            aborted = await self.gateway.drain(timeout_s)
            if aborted:
                logger.warning("aborted %d requests still running after the %g s drain", aborted, timeout_s)
            await asyncio.sleep(0.2)  # let the aborted streams send their error to the client
        if self.grpc is not None:
            await self.grpc.stop(grace_s=1.0)
        if self.http is not None:
            await self.http.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._state is not None:
            await self._state.stop()
            if self._state.store is not None:
                await self._state.store.close()
            self._state = None
        # All replicas at once: one slow or dead replica must not hold up the others' shutdown.
        await asyncio.gather(*(stop_replica(actor) for actor in self._actors.values()))
        if self._actors and ray.is_initialized():
            # Each replica frees its shards' groups in shutdown(); this frees those of any that
            # died or did not get that far (Ray would keep them until this job ends).
            with contextlib.suppress(Exception):
                remove_groups(self.placement_owner)
        self._actors.clear()
        if self._redis is not None:
            self._redis.stop()
            self._redis = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
        if self.gateway is not None:
            self.gateway.close()
        self.gateway, self.grpc, self.http = None, None, None

