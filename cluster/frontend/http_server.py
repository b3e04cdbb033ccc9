"""The OpenAI HTTP API's server: uvicorn on the frontend's event loop, started and stopped by
``Server`` (which owns SIGINT/SIGTERM and drains first)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import uvicorn

from kvtide.cluster.frontend.gateway import Gateway
from kvtide.cluster.frontend.http_api import create_app


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: ``kvtide serve`` owns SIGINT/SIGTERM and drains."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    def __init__(self, server: _Uvicorn, task: asyncio.Task, port: int) -> None:
        self._server, self._task, self.port = server, task, port

    @classmethod
    async def start(
        cls, gateway: Gateway, host: str, port: int, tls_cert: Path | None, tls_key: Path | None,
        drain_timeout_s: float,
    ) -> HttpServer:  # fmt: skip
        """Listen (``port=0`` picks a free one); raises why it could not start (e.g. the port is
        taken)."""
        config = uvicorn.Config(
            create_app(gateway), host=host, port=port, log_level="warning",
            ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None,
            timeout_graceful_shutdown=max(1, int(drain_timeout_s)), lifespan="off",
        )  # fmt: skip
        server = _Uvicorn(config)
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the HTTP server exited during startup")
            await asyncio.sleep(0.05)
        return cls(server, task, server.servers[0].sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """uvicorn closes its sockets on the way out; cancelling it mid-shutdown would leak them.
        It gives open connections ``timeout_graceful_shutdown``, then closes them."""
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, self._server.config.timeout_graceful_shutdown + 5.0)
