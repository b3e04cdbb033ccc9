"""One multi-node scenario, run as its own process (a test process holds one Ray connection, and
this needs a cluster of its own): three Ray nodes on 127.0.0.1, each started with its own
``KVTIDE_CACHE_DIR`` (so each node converts the model into its own cache, as separate machines
would; the compiled kernels are linked in from this process's cache: building them three times
over took most of the scenario's five minutes, and ``test_front_door`` tests builds);
``kvtide serve --address`` joins it with a PP=2 replica, ``--host 0.0.0.0`` and the embedded
Redis behind a generated password; a few requests; SIGTERM. Prints one JSON line of what it saw.

    python tests/integration/multinode_scenario.py WORKDIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import httpx  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kvtide.kernels.cpu_build import extensions_root  # noqa: E402
from tests.integration.serve_process import ServeProcess, clean_env  # noqa: E402

LOOPBACK = "127.0.0.1"


def main(workdir: Path) -> dict:
    caches = [workdir / f"node{i}-cache" for i in range(3)]
    for cache in caches:  # the kernels this process's cache has built: the scenario is about the model
        cache.mkdir(parents=True)
        (cache / "extensions").symlink_to(extensions_root(), target_is_directory=True)
    cluster = None
    try:
        os.environ["KVTIDE_CACHE_DIR"] = str(caches[0])  # raylets inherit this process's environment
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": LOOPBACK,
                                                                 "include_dashboard": False})  # fmt: skip
        for cache in caches[1:]:
            os.environ["KVTIDE_CACHE_DIR"] = str(cache)
            cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        frontend_cache = workdir / "frontend-cache"
        kvtide = Path(sys.executable).with_name("kvtide")
        cmd = [str(kvtide), "serve", "--address", cluster.address, "--pp", "2", "--host", "0.0.0.0",
               "--grpc-port", "0", "--http-port", "0", "--kv-cache-gib", "0.05", "--max-model-len", "512",
               "--drain-timeout-s", "5"]  # fmt: skip
        env = clean_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", KVTIDE_CACHE_DIR=str(frontend_cache))
        server = ServeProcess.start(cmd, env, timeout_s=600)
        try:
            replies = []
            with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}/v1", timeout=120) as client:
                for prompt in ("The tide", "Once upon a time"):
                    r = client.post("/completions", json={"model": "smollm2-135m", "prompt": prompt, "max_tokens": 4,
                                                          "temperature": 0})  # fmt: skip
                    replies.append((r.status_code, r.json()))
            code = server.terminate()
        finally:
            server.kill()
        converted = {str(c): sorted(p.name for p in (c / "models").glob("*")) if (c / "models").exists() else []
                     for c in (*caches, frontend_cache)}  # fmt: skip
        return {"replies": replies, "exit_code": code, "log": server.log, "converted": converted}
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
