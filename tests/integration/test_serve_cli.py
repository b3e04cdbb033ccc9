"""The README's main command for real: ``kvtide serve`` as a subprocess on loopback. It logs
where it listens, answers over HTTP and gRPC, and on SIGTERM stops everything it started
(its private Ray cluster and the embedded Redis) and exits 0; with ``--address`` it joins a
running cluster instead and leaves it running."""

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


def _start_serve(*args: str, env: dict[str, str]):
    """``kvtide serve`` on free ports, its output collected on a thread; returns (proc, lines,
    reader, log) once it says it is serving."""
    kvtide = Path(sys.executable).with_name("kvtide")
    proc = subprocess.Popen(
        [str(kvtide), "serve", "--grpc-port", "0", "--http-port", "0", "--kv-cache-gib", "0.05",
         "--max-model-len", "512", "--drain-timeout-s", "5", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not any("Ctrl-C drains and stops" in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc, reader)
            raise AssertionError("kvtide serve did not start:\n" + "".join(lines[-30:]))
        time.sleep(0.2)
    return proc, lines, reader, "".join(lines)


def _kill(proc, reader) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    reader.join(10)
    proc.stdout.close()


def _answers(log: str) -> None:
    """One HTTP completion and one gRPC completion, at the ports the log names."""
    grpc_port = int(re.search(r"gRPC \(kvtide\.v1\.Kvtide, health, reflection\) on 127\.0\.0\.1:(\d+)", log)[1])
    http_base = re.search(r"OpenAI HTTP API on (http://127\.0\.0\.1:\d+/v1)", log)[1]
    reply = httpx.post(
        f"{http_base}/completions", json={"model": "smollm2-135m", "prompt": "The tide", "max_tokens": 4}, timeout=60
    ).json()
    assert reply["usage"]["completion_tokens"] == 4
    with KvtideClient(f"127.0.0.1:{grpc_port}", timeout_s=60) as client:
        assert client.complete("The tide", max_tokens=3, temperature=0.0).finish_reason == "length"


def test_kvtide_serve_answers_and_stops_everything_on_sigterm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc, lines, reader, log = _start_serve(env=env)
    try:
        assert "embedded Redis on redis://127.0.0.1:" in log
        _answers(log)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("redis-server" in " ".join(c.cmdline()) for c in children if c.is_running())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, "".join(lines[-30:])
        reader.join(10)
        assert "stopped" in lines[-1]
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running after kvtide serve exited: {[p.cmdline()[:2] for p in alive]}"
    finally:
        _kill(proc, reader)


def test_kvtide_serve_joins_a_running_cluster_and_leaves_it_running(cluster):
    """``--address``: the replicas are placed on the test's two-node cluster; on SIGTERM the
    server gives back what it took and the cluster stays up."""
    import ray

    free = ray.available_resources()["CPU"]  # earlier tests may hold some
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # this test's cluster is on loopback
    proc, lines, reader, log = _start_serve("--address", cluster.address, env=env)
    try:
        assert f"joined the Ray cluster at {cluster.address}" in log
        assert "started a local Ray cluster" not in log
        _answers(log)
        assert ray.available_resources().get("CPU", 0) <= free - 1  # the replica's shard holds one
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, "".join(lines[-30:])
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0) < free:
            assert time.monotonic() < deadline, (
                f"CPUs not given back: {ray.available_resources()}\n" + "".join(lines[-30:])
            )
            time.sleep(0.2)
        assert ray.get(ray.put("still up"), timeout=30) == "still up"
    finally:
        _kill(proc, reader)
