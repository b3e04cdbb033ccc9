"""``kvtide serve`` as a subprocess on loopback for the bench scripts that compare it with other
tools or servers (bench/aiperf_check.py, bench/peers_serving.py).

It runs with the settings bench/peers.py gives vLLM: 2 CPU threads, fp32, a 2 GiB KV cache,
64 sequences and 1,024 tokens per step, prefix caching on. ``start_kvtide`` returns once
``GET /v1/models`` answers; ``stop_kvtide`` is Ctrl-C to its process group (it drains and stops
its own local Ray and Redis), then SIGKILL if it has not exited in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from peers import KV_CACHE_GIB, MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS, REPO, SERVED_MODEL_NAME, launch_until_ready, stop_server

KVTIDE = REPO / ".venv" / "bin" / "kvtide"


def kvtide_command(http_port: int, grpc_port: int, threads: int = 2) -> list[str]:
    return [
        str(KVTIDE), "serve", "--model", SERVED_MODEL_NAME, "--threads", str(threads), "--dtype", "float32",
        "--kv-cache-gib", str(KV_CACHE_GIB), "--max-num-seqs", str(MAX_NUM_SEQS),
        "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS), "--host", "127.0.0.1",
        "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--drain-timeout-s", "5",
    ]  # fmt: skip


def start_kvtide(http_port: int, grpc_port: int, threads: int = 2, log_path: Path | None = None,
                 timeout_s: float = 600.0) -> subprocess.Popen:  # fmt: skip
    """Start ``kvtide serve`` in its own process group; return once its HTTP API answers.
    Raises (after stopping it) if it exits or is not ready within ``timeout_s``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}  # never join another cluster
    cmd = kvtide_command(http_port, grpc_port, threads)
    return launch_until_ready("kvtide serve", cmd, env, http_port, log_path, timeout_s, stop_kvtide)


def stop_kvtide(proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Ctrl-C to the server's process group (drain, stop Ray); SIGKILL after ``timeout_s``."""
    stop_server(proc, timeout_s, signal.SIGINT)
