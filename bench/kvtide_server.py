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
import time
import urllib.request
from pathlib import Path

from peers import KV_CACHE_GIB, MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS, REPO, SERVED_MODEL_NAME

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
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
    cmd = kvtide_command(http_port, grpc_port, threads)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{http_port}/v1/models"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kvtide serve exited with {proc.returncode} before it was ready (log: {log_path})")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(1.0)
    stop_kvtide(proc)
    raise TimeoutError(f"kvtide serve not ready on {url} within {timeout_s:.0f} s (log: {log_path})")


def stop_kvtide(proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Ctrl-C to the server's process group (drain, stop Ray); SIGKILL after ``timeout_s``."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    try:  # children that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
