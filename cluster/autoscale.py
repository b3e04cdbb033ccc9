"""``kvtide serve --autoscale FILE``: the control loop (autoscaler/loop.py) wired to a running
``Server``: its ``Fleet`` (fleet.py), the frontend's histograms, queue and KV usage as the
loop's signals, its Prometheus registry for the loop's metrics, and Ray's
``request_resources`` when the server joined a Ray cluster (whose autoscaler adds the nodes).

``serve_config_for`` sizes the server's first replicas by the profile the policy wants of an
idle fleet now, so the loop starts from that fleet rather than rolling the command line's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from kvtide.cluster.autoscaler.config import AutoscaleConfig
from kvtide.cluster.autoscaler.histograms import Histogram
from kvtide.cluster.autoscaler.loop import ControlLoop, LiveSignals, initial_target
from kvtide.cluster.fleet import Fleet, engine_for_profile
from kvtide.cluster.serve_config import ServeConfig

logger = logging.getLogger(__name__)


def serve_config_for(config: ServeConfig, autoscale: AutoscaleConfig,
                     when: datetime | None = None) -> tuple[ServeConfig, str]:  # fmt: skip
    """``config`` with the initial profile's engine sizing and replica count, and that profile."""
    profile, count = initial_target(autoscale, when or datetime.now(timezone.utc))
    engine = engine_for_profile(config.engine, autoscale.profiles[profile])
    return dataclasses.replace(config, engine=engine, num_replicas=max(1, count)), profile


def frontend_signals(server):
    """The frontend's live state as the loop reads it each tick."""

    def read() -> LiveSignals:
        gateway = server.gateway
        m = gateway.metrics
        status = gateway.replicas.routing_status()
        loads = [r.load for r in status.replicas] if status is not None else []
        return LiveSignals(
            ttft_s=Histogram.from_prometheus(m.ttft), itl_s=Histogram.from_prometheus(m.itl),
            prompt_tokens=Histogram.from_prometheus(m.prompt_tokens),
            output_tokens=Histogram.from_prometheus(m.generation_tokens),
            arrivals=Histogram.from_prometheus(m.queue_time),
            queue_depth=gateway.admission.num_queued + sum(load.num_waiting for load in loads),
            kv_usage=sum(load.kv_cache_usage for load in loads) / len(loads) if loads else 0.0,
        )  # fmt: skip

    return read


class RayResources:
    """``request_resources`` off the event loop (it is a blocking call to Ray's GCS): one at a
    time, the newest wins; a failure is logged, and the next change asks again."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtide-request-resources")

    def __call__(self, bundles: list[dict[str, float]]) -> None:
        self._pool.submit(self._ask, bundles)

    @staticmethod
    def _ask(bundles: list[dict[str, float]]) -> None:
        from ray.autoscaler.sdk import request_resources

        try:
            request_resources(bundles=bundles)
        except Exception as exc:  # noqa: BLE001 - Ray's autoscaler is advisory; serving goes on
            logger.warning("autoscaler: asking Ray for %d shard bundle(s) failed: %s", len(bundles), exc)
            return
        logger.info("autoscaler: asked Ray for %d shard bundle(s) of %s", len(bundles), bundles[0] if bundles else {})

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Autoscaler:
    """The loop and the fleet of one server, on the server's event loop."""

    def __init__(self, server, config: AutoscaleConfig, initial_profile: str, *, clock=None, wall=None,
                 drain_timeout_s: float | None = None) -> None:  # fmt: skip
        drain_s = server.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self.fleet = Fleet(server, config.profiles, initial_profile, drain_timeout_s=drain_s)
        self.ray = RayResources() if server.config.address is not None else None
        gpu = server._resolved is not None and server._resolved.device.type == "cuda"
        kwargs = {k: v for k, v in (("clock", clock), ("wall", wall)) if v is not None}
        self.loop = ControlLoop(
            config, self.fleet, frontend_signals(server), shard_bundle={"GPU": 1.0} if gpu else {"CPU": 1.0},
            request_resources=self.ray,
            registry=server.gateway.metrics.registry, **kwargs,
        )  # fmt: skip
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        logger.info("autoscaler: policy %s every %g s over %g s windows", self.loop.config.policy,
                    self.loop.config.control_interval_s, self.loop.config.window_s)  # fmt: skip
        self._task = asyncio.get_running_loop().create_task(self.loop.run(), name="kvtide-autoscaler")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """No more decisions; what is under way (starts, drains) is cancelled: the server's stop
        stops every replica it has."""
        self.loop.stop()
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout_s)
        await self.fleet.close(timeout_s)
        if self.ray is not None:
            self.ray.close()
