"""The README's main command for real: ``kvtide serve`` as a subprocess on loopback. It logs
where it listens, answers over HTTP and gRPC, and on SIGTERM stops everything it started
(its private Ray cluster and the embedded Redis) and exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from kvtide.cluster.client import KvtideClient

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 300.0


def test_kvtide_serve_answers_and_stops_everything_on_sigterm():
    kvtide = Path(sys.executable).with_name("kvtide")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.Popen(
        [str(kvtide), "serve", "--grpc-port", "0", "--http-port", "0", "--kv-cache-gib", "0.05",
         "--max-model-len", "512", "--drain-timeout-s", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not any("Ctrl-C drains and stops" in line for line in lines):
            assert proc.poll() is None, "kvtide serve exited early:\n" + "".join(lines[-30:])
            assert time.monotonic() < deadline, "kvtide serve did not start:\n" + "".join(lines[-30:])
            time.sleep(0.2)
        log = "".join(lines)
        grpc_port = int(re.search(r"gRPC \(kvtide\.v1\.Kvtide, health, reflection\) on 127\.0\.0\.1:(\d+)", log)[1])
        http_base = re.search(r"OpenAI HTTP API on (http://127\.0\.0\.1:\d+/v1)", log)[1]
        assert "embedded Redis on redis://127.0.0.1:" in log

        reply = httpx.post(
            f"{http_base}/completions", json={"model": "smollm2-135m", "prompt": "The tide", "max_tokens": 4}, timeout=60
        ).json()
        assert reply["usage"]["completion_tokens"] == 4
        with KvtideClient(f"127.0.0.1:{grpc_port}", timeout_s=60) as client:
            assert client.complete("The tide", max_tokens=3, temperature=0.0).finish_reason == "length"

        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("redis-server" in " ".join(c.cmdline()) for c in children if c.is_running())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, "".join(lines[-30:])
        reader.join(10)
        assert "stopped" in lines[-1]
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running after kvtide serve exited: {[p.cmdline()[:2] for p in alive]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        reader.join(10)
        proc.stdout.close()
