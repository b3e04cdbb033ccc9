"""The README's main command for real: ``kvtide serve`` as a subprocess on loopback. It logs
where it listens, answers over HTTP and gRPC, and on SIGTERM stops everything it started
(its private Ray cluster and the embedded Redis) and exits 0; with ``--address`` it joins a
running cluster instead and leaves it running."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from kvtide.cluster.client import KvtideClient
from tests.integration.serve_process import ServeProcess, clean_env

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 300.0


def _start_serve(*args: str, env: dict[str, str]) -> ServeProcess:
    """``kvtide serve`` on free ports, once it says it is serving."""
    kvtide = Path(sys.executable).with_name("kvtide")
    cmd = [str(kvtide), "serve", "--grpc-port", "0", "--http-port", "0", "--kv-cache-gib", "0.05",
           "--max-model-len", "512", "--drain-timeout-s", "5", *args]  # fmt: skip
    return ServeProcess.start(cmd, env, START_TIMEOUT_S)


def _answers(server: ServeProcess) -> None:
    """One HTTP completion and one gRPC completion, at the ports the log names."""
    reply = httpx.post(
        f"{server.http_base}/completions", json={"model": "smollm2-135m", "prompt": "The tide", "max_tokens": 4},
        timeout=60,
    ).json()
    assert reply["usage"]["completion_tokens"] == 4
    with KvtideClient(f"127.0.0.1:{server.grpc_port}", timeout_s=60) as client:
        assert client.complete("The tide", max_tokens=3, temperature=0.0).finish_reason == "length"


def test_kvtide_serve_answers_and_stops_everything_on_sigterm():
    server = _start_serve(env=clean_env())
    try:
        assert "embedded Redis on redis://127.0.0.1:" in server.log
        _answers(server)
        children = psutil.Process(server.proc.pid).children(recursive=True)
        assert any("redis-server" in " ".join(c.cmdline()) for c in children if c.is_running())
        # Ray's workers default to niceness +15; the private cluster starts them at +0, i.e. at
        # kvtide serve's own niceness (0 unless the whole test run is niced).
        shards = [c for c in children if c.is_running() and c.name().startswith("ray::ShardActor")]
        own = psutil.Process(server.proc.pid).nice()
        assert shards and {s.nice() for s in shards} == {own}, [(s.name(), s.nice(), own) for s in shards]
        assert server.terminate() == 0, server.tail()
        assert "stopped" in server.lines[-1]
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running after kvtide serve exited: {[p.cmdline()[:2] for p in alive]}"
    finally:
        server.kill()


def test_kvtide_serve_joins_a_running_cluster_and_leaves_it_running(cluster):
    """``--address``: the replicas are placed on the test's two-node cluster; on SIGTERM the
    server gives back what it took and the cluster stays up."""
    import ray

    free = ray.available_resources()["CPU"]  # earlier tests may hold some
    # This test's cluster is on loopback.
    server = _start_serve("--address", cluster.address, env=clean_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"))
    try:
        assert f"joined the Ray cluster at {cluster.address}" in server.log
        assert "started a local Ray cluster" not in server.log
        _answers(server)
        assert ray.available_resources().get("CPU", 0) <= free - 1  # the replica's shard holds one
        assert server.terminate() == 0, server.tail()
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0) < free:
            assert time.monotonic() < deadline, (
                f"CPUs not given back: {ray.available_resources()}\n" + server.tail()
            )
            time.sleep(0.2)
        assert ray.get(ray.put("still up"), timeout=30) == "still up"
    finally:
        server.kill()
