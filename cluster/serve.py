"""``kvtide serve``: Ray, N replicas, Redis, the router and both frontends, started and stopped
as one.

``Server.start()`` joins a Ray cluster (``--address``) or starts a private one on loopback,
starts the replicas (each a ``ReplicaActor`` with its shard workers) and waits until each has
run a real step, starts Redis (an embedded ``redis-server`` unless a URL is given), then
feeds the router from it (``ClusterState``), and serves gRPC and OpenAI HTTP on loopback by
default. ``Server.stop()`` drains: health turns
NOT_SERVING, new requests get UNAVAILABLE / 503, in-flight ones get ``drain_timeout_s`` to
finish and are then aborted with a reason that says so; then it stops everything it
started, in reverse order, and nothing it did not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import uvicorn

from kvtide.cluster.cluster_state import ClusterState
from kvtide.cluster.diagnostics import ray_logs_hint
from kvtide.cluster.frontend import GrpcServer, start_grpc_server
from kvtide.cluster.gateway import FrontendConfig, Gateway, ModelSpec
from kvtide.cluster.placement import remove_groups
from kvtide.cluster.http_api import create_app
from kvtide.cluster.replica import ReplicaActor
from kvtide.cluster.replica_set import ReplicaSet
from kvtide.cluster.state_store import StateStore
from kvtide.router import Router
from kvtide.workers.config import EngineConfig, resolve
from kvtide.workers.model_files import resolve_model
from kvtide.workers.model_loader import read_hf_config
from kvtide.workers.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    model: str = "smollm2-135m"
    num_replicas: int = 1
    tp: int = 1
    pp: int = 1
    engine_options: dict[str, Any] = field(default_factory=dict)
    """Flat ``EngineConfig`` options for every replica (``max_model_len``, ``num_blocks``...)."""
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    """0 picks a free port."""
    http_port: int = 8000
    address: str | None = None
    """An existing Ray cluster to join; None starts a private one on loopback."""
    redis_url: str | None = None
    """None starts an embedded redis-server on loopback; "" runs without Redis."""
    routing_policy: str = "kv_aware"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    drain_timeout_s: float = 30.0
    replica_start_timeout_s: float = 600.0
    stats_interval_s: float = 2.0
    frontend: FrontendConfig = field(default_factory=FrontendConfig)

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")


HEALTH_PROBE_TIMEOUT_S = 60.0
"""One 1-token step through every shard, once they reported ready (loaded and built)."""


class StartupError(RuntimeError):
    """``kvtide serve`` could not start; the message says what did not finish and where to look."""


def _root_cause(exc: BaseException) -> str:
    """The innermost error's text: Ray wraps a replica's constructor error in two layers."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    while cause is not None and (getattr(cause, "cause", None) or cause.__cause__) is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    return str(cause or exc).strip().splitlines()[-1]


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: ``kvtide serve`` owns SIGINT/SIGTERM and drains."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class Server:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.gateway: Gateway | None = None
        self.grpc: GrpcServer | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.redis_url: str | None = None
        self._actors: dict[str, Any] = {}
        self._started_ray = False
        self._redis = None
        self._http: _Uvicorn | None = None
        self._http_task: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self._state: ClusterState | None = None
        self.placement_owner = f"kvtide-{uuid.uuid4().hex[:12]}"
        """Prefix of every placement group this server's replicas create."""

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop(drain_timeout_s=0)
            raise

    async def _start(self) -> None:
        cfg = self.config
        spec, tokenizer = _model_spec(cfg)
        self._init_ray()
        await self._start_replicas()
        self._start_redis()
        router = await self._start_cluster_state()
        replicas = ReplicaSet(self._actors, router, feed_loads=self._state.store is None)
        replicas.on_replica_failed = self._replica_failed
        await replicas.refresh_stats()
        self.gateway = Gateway(spec, tokenizer, replicas, cfg.frontend)
        self._tasks.append(asyncio.create_task(replicas.refresh_forever(cfg.stats_interval_s)))
        cert, key = (p.read_bytes() if p else None for p in (cfg.tls_cert, cfg.tls_key))
        self.grpc = await start_grpc_server(self.gateway, cfg.host, cfg.grpc_port, cert, key)
        self.grpc_port = self.grpc.port
        await self._start_http(cert is not None)
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
            # NOTE: address="local": a bare ray.init() would join any cluster already running
            # on this machine (someone else's) instead of starting ours. The private cluster
            # stays on loopback whatever --host the API binds.
            info = ray.init(
                address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1"
            )
            logger.info("started a local Ray cluster at %s", info.address_info.get("gcs_address"))
        self._started_ray = True

    async def _start_replicas(self) -> None:
        cfg = self.config
        for i in range(cfg.num_replicas):
            self._actors[f"replica-{i}"] = ReplicaActor.options(num_cpus=0).remote(
                cfg.model, cfg.tp, cfg.pp, start_timeout_s=cfg.replica_start_timeout_s,
                placement_owner=f"{self.placement_owner}/replica-{i}", **cfg.engine_options,
            )  # fmt: skip
        for rid, actor in self._actors.items():
            await self._wait_ready(rid, actor)
            info = await actor.info.remote()
            logger.info("%s ready: tp=%d pp=%d, %d KV blocks of %d tokens",
                        rid, info.tp, info.pp, info.num_blocks, info.block_size)  # fmt: skip

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
            raise StartupError(f"{rid} failed to start: {_root_cause(exc)}") from exc
        if not ok:
            raise StartupError(f"{rid} started but its probe step did not finish; see {ray_logs_hint()}")

    async def _start_cluster_state(self) -> Router:
        """The router, fed by ``ClusterState``: from Redis when there is one (each replica
        publishes its registration, load and KV events there: exact routing), else from direct
        registration here and the frontend's stats refresh (approximate routing)."""
        cfg = self.config
        seed = str(cfg.engine_options.get("hash_seed", "")).encode()
        info = await next(iter(self._actors.values())).info.remote()
        router = Router(cfg.routing_policy, block_size=info.block_size, hash_seed=seed)
        store = StateStore(self.redis_url) if self.redis_url else None
        for rid, actor in self._actors.items():
            if store is not None:
                await actor.start_publishing.remote(self.redis_url, rid, cfg.model)
            else:
                router.register(await actor.registration.remote(rid, cfg.model))

        async def snapshot(rid: str):
            return await self._actors[rid].kv_snapshot.remote()

        self._state = ClusterState(router, store, snapshot)
        self._state.start()
        deadline = asyncio.get_running_loop().time() + cfg.replica_start_timeout_s
        while router.replica_ids() != sorted(self._actors):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"replicas did not register with the router: {router.status()}")
            await asyncio.sleep(0.05)
        return router

    def _replica_failed(self, replica_id: str) -> None:
        """A request or the stats refresh found the replica dead (``ReplicaSet`` says so once):
        stop routing to it now, and
        free its shards' placement groups once Ray confirms the actor is gone (a live one keeps
        them)."""
        if self._state is not None:
            self._state.replica_failed(replica_id)
        self._tasks.append(asyncio.create_task(self._free_if_dead(replica_id)))

    async def _free_if_dead(self, replica_id: str) -> None:
        try:
            await asyncio.wait_for(self._actors[replica_id].num_restarts.remote(), 30.0)
        except ray.exceptions.ActorDiedError:
            freed = await asyncio.to_thread(remove_groups, f"{self.placement_owner}/{replica_id}")
            logger.warning("%s is dead; freed its %d placement group(s)", replica_id, freed)
        except Exception as exc:  # noqa: BLE001 - alive but slow, or unreachable: leave it for stop()
            logger.info("%s did not answer as dead (%s); its placement groups stay until stop", replica_id, exc)

    def _start_redis(self) -> None:
        url = self.config.redis_url
        if url is None:
            from kvtide.cluster.redis_server import start_redis

            self._redis = start_redis(self.config.host)
            url = self._redis.url
            logger.info("embedded Redis on %s", url)
        self.redis_url = url or None

    async def _start_http(self, tls: bool) -> None:
        cfg = self.config
        config = uvicorn.Config(
            create_app(self.gateway), host=cfg.host, port=cfg.http_port, log_level="warning",
            ssl_certfile=str(cfg.tls_cert) if tls else None, ssl_keyfile=str(cfg.tls_key) if tls else None,
            timeout_graceful_shutdown=max(1, int(cfg.drain_timeout_s)), lifespan="off",
        )  # fmt: skip
        self._http = _Uvicorn(config)
        task = self._http_task = asyncio.create_task(self._http.serve())
        while not self._http.started:
            if task.done():
                task.result()  # raises why it could not start (e.g. the port is taken)
                raise RuntimeError("the HTTP server exited during startup")
            await asyncio.sleep(0.05)
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Drain, then stop everything this server started (idempotent)."""
        timeout_s = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        if self.grpc is not None:
            await self.grpc.set_serving(False)
        if self.gateway is not None:
            aborted = await self.gateway.drain(timeout_s)
            if aborted:
                logger.warning("aborted %d requests still running after the %g s drain", aborted, timeout_s)
            await asyncio.sleep(0.2)  # let the aborted streams send their error to the client
        if self._http is not None:
            self._http.should_exit = True
        if self.grpc is not None:
            await self.grpc.stop(grace_s=1.0)
        if self._http_task is not None:
            # uvicorn closes its sockets on the way out; cancelling it mid-shutdown would leak
            # them. It gives open connections timeout_graceful_shutdown, then closes them.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, self._http.config.timeout_graceful_shutdown + 5.0)
            self._http_task = None
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
        await asyncio.gather(*(_stop_replica(actor) for actor in self._actors.values()))
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
        self.gateway, self.grpc, self._http = None, None, None


async def _stop_replica(actor) -> None:
    """Leave the registry, stop stepping and free the shards; then kill the actor. Never raises:
    whatever fails here, the rest of ``Server.stop`` (Redis, Ray) still runs."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(actor.stop_publishing.remote(), 10.0)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(actor.shutdown.remote(), 30.0)
    with contextlib.suppress(Exception):
        ray.kill(actor)


def _model_spec(cfg: ServeConfig) -> tuple[ModelSpec, Tokenizer]:
    """What the frontend validates against, resolved exactly as each replica resolves it."""
    model_dir = resolve_model(cfg.model)
    engine = EngineConfig.from_kwargs(model=str(model_dir), **cfg.engine_options)
    resolved = resolve(engine, str(model_dir), read_hf_config(model_dir))
    spec = ModelSpec(
        name=cfg.model,
        max_model_len=resolved.max_model_len,
        vocab_size=resolved.vocab_size,
        max_num_seqs=engine.scheduler.max_num_seqs,
    )
    return spec, Tokenizer.from_dir(model_dir)


async def serve_forever(config: ServeConfig) -> None:
    """Run until SIGINT or SIGTERM, then drain and stop."""
    server = Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def take_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

    take_signals()
    try:
        await server.start()
        # NOTE: ray.init installs its own SIGTERM handler in this process, which aborts it
        # (exit -6, nothing drained or stopped); take the signals back once Ray is up.
        take_signals()
        logger.info("serving %s with %d replica(s); Ctrl-C drains and stops", config.model, config.num_replicas)
        await stop.wait()
        logger.info("shutting down: draining for up to %g s", config.drain_timeout_s)
    finally:
        await server.stop()
        logger.info("stopped")
