"""``kvtide serve``: run a ``Server`` (and, with ``--autoscale``, its autoscaler) until SIGINT or
SIGTERM, then drain and stop."""

from __future__ import annotations

import asyncio
import logging
import signal

from kvtide.cluster.autoscale import Autoscaler, serve_config_for
from kvtide.cluster.autoscaler.config import AutoscaleConfig
from kvtide.cluster.serve_config import ServeConfig, StartupError
from kvtide.cluster.server import Server

__all__ = ["ServeConfig", "Server", "StartupError", "serve_forever"]

logger = logging.getLogger(__name__)


async def serve_forever(config: ServeConfig, autoscale: AutoscaleConfig | None = None) -> None:
    """Run until SIGINT or SIGTERM, then drain and stop. ``autoscale``: the server's replicas
    start at the profile the policy wants now, and a control loop reshapes them while serving."""
    profile = None
    if autoscale is not None:
        config, profile = serve_config_for(config, autoscale)
    server = Server(config)
    autoscaler = None
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
        if autoscale is not None:
            autoscaler = Autoscaler(server, autoscale, profile)
            autoscaler.start()
        logger.info("serving %s with %d replica(s); Ctrl-C drains and stops", config.model, config.num_replicas)
        await stop.wait()
        logger.info("shutting down: draining for up to %g s", config.drain_timeout_s)
    finally:
        if autoscaler is not None:
            await autoscaler.stop()
        await server.stop()
        logger.info("stopped")
