"""The autoscaler live, run as its own process (it needs a Ray cluster of its own, with Ray's
autoscaler): a head on 127.0.0.1 with one CPU and a worker node type of one CPU that Ray's fake
multi-node provider starts on demand (what ``ray.cluster_utils.AutoscalingCluster`` sets up,
started here on its own ports and temp dir and stopped by the ids of its own processes: that
class runs ``ray stop --force``, which would stop every Ray on the machine). A ``Server`` on a
tiny model joins it with the autoscaler on, a load generator counts every request.

    python tests/integration/autoscaling_scenario.py WORKDIR reactive
    python tests/integration/autoscaling_scenario.py WORKDIR season

``reactive``: a burst raises the replicas 1 -> 2 (Ray adds a node), then it drains back to 1.
``season``: the scheduled policy on a fake clock switches profile; the replicas roll under
steady load. Prints one JSON line of what it saw.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# NOTE: `ray start` turns token auth on when ~/.ray/auth_token exists, and a driver then needs
# that token: a token of our own, for this cluster's processes (they inherit the environment).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = uuid.uuid4().hex
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)

import ray  # noqa: E402
import tokenizers  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kvtide.cluster.autoscale import Autoscaler, serve_config_for  # noqa: E402
from kvtide.cluster.autoscaler.config import parse_config  # noqa: E402
from kvtide.cluster.client import KvtideClient  # noqa: E402
from kvtide.cluster.serve import Server, ServeConfig  # noqa: E402
from kvtide.workers import EngineConfig  # noqa: E402
from tests.tiny import write_tiny_llama  # noqa: E402

LOOPBACK = "127.0.0.1"
VOCAB = 96
MAX_TOKENS = 24
TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class LocalAutoscalingCluster:
    """A Ray head with Ray's autoscaler and the fake multi-node provider, on loopback."""

    def __init__(self, workdir: Path, head_cpus: int, worker_cpus: int, max_workers: int) -> None:
        self.port = free_port()
        self.temp_dir = Path(f"/tmp/kvtas-{os.getpid()}")
        config = {
            "cluster_name": f"kvtide-autoscaling-{os.getpid()}", "max_workers": max_workers,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": f"{LOOPBACK}:{self.port}"},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
                "cpu_worker": {"resources": {"CPU": worker_cpus}, "node_config": {}, "min_workers": 0,
                               "max_workers": max_workers},
            },
            "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.2,
            "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [],
        }  # fmt: skip
        self.config_path = workdir / "autoscaling-cluster.json"
        self.config_path.write_text(json.dumps(config))
        self.head_cpus = head_cpus

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> None:
        ray_bin = Path(sys.executable).with_name("ray")
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
        cmd = [str(ray_bin), "start", "--head", f"--autoscaling-config={self.config_path}", f"--port={self.port}",
               f"--num-cpus={self.head_cpus}", f"--node-ip-address={LOOPBACK}", f"--temp-dir={self.temp_dir}",
               "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}"]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)

    def pids(self) -> list[int]:
        """Every process of this cluster: their command lines name its temp dir."""
        mine = str(self.temp_dir).encode()
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if mine in (entry / "cmdline").read_bytes():
                        out.append(int(entry.name))
                except OSError:
                    continue
        return out

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
        if not self.pids():
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def write_tokenizer(model_dir: Path) -> None:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t2", "unk_token": "t0"}))


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout_s: float = TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def call(self, fn):
        async def call():
            return fn()

        return self.run(call(), 30)


class Load:
    """``clients`` threads, each sending one request after another until stopped; every
    request counted, every failure kept."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[tuple[threading.Thread, threading.Event]] = []

    def add(self, clients: int) -> threading.Event:
        stop = threading.Event()
        for i in range(clients):
            t = threading.Thread(target=self._client, args=(len(self._threads) * 100 + i, stop), daemon=True)
            t.start()
            self._threads.append((t, stop))
        return stop

    def _client(self, seed: int, stop: threading.Event) -> None:
        with KvtideClient(self.target, timeout_s=120) as client:
            n = 0
            while not stop.is_set():
                prompt = [(seed * 7 + n * 13 + k) % (VOCAB - 3) + 3 for k in range(12)]
                n += 1
                try:
                    done = client.complete(prompt, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0)
                    ok = done.finish_reason == "length" and len(done.token_ids) == MAX_TOKENS
                    with self._lock:
                        if ok:
                            self.ok += 1
                        else:
                            self.failures.append(f"finish {done.finish_reason}, {len(done.token_ids)} tokens")
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with self._lock:
                        self.failures.append(repr(exc)[:300])

    def stop_all(self) -> None:
        for _, stop in self._threads:
            stop.set()
        for t, _ in self._threads:
            t.join(150)


class Watch:
    """The fleet sampled from the server's loop every 0.2 s."""

    def __init__(self, runner: LoopThread, autoscaler: Autoscaler) -> None:
        self.runner, self.autoscaler = runner, autoscaler
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def fleet(self) -> list[tuple[str, str, str]]:
        views = self.runner.call(self.autoscaler.fleet.views)
        return [(v.replica_id, v.profile, v.state) for v in views]

    def _run(self) -> None:
        while not self._stop.is_set():
            fleet = self.fleet()
            self.samples.append({"t": time.monotonic(), "fleet": fleet,
                                 "nodes": sum(1 for n in ray.nodes() if n["Alive"])})  # fmt: skip
            time.sleep(0.2)

    def until(self, predicate, what: str, timeout_s: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self.fleet()):
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout_s:g} s waiting until {what}; fleet {self.fleet()}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def ready(fleet, profile: str | None = None) -> int:
    return sum(1 for _, p, s in fleet if s == "ready" and (profile is None or p == profile))


PROFILE = {"max_model_len": 256, "max_num_seqs": 2, "max_num_batched_tokens": 64, "kv_cache_gib": 0.01}
SLO = {"ttft_p90_s": 600.0, "itl_p90_s": 60.0}  # only the queue moves the reactive policy here
REACTIVE = {"policy": "reactive", "control_interval_s": 0.5, "window_s": 2, "cold_start_s": 30, "slo": SLO,
            "profiles": {"small": PROFILE},
            "reactive": {"profile": "small", "min_replicas": 1, "max_replicas": 2, "queue_up": 2.0,
                         "queue_down": 0.25, "kv_usage_up": 1.0, "kv_usage_down": 0.99, "up_cooldown_s": 0,
                         "down_cooldown_s": 4}}  # fmt: skip
T0 = datetime(2024, 3, 5, 11, 0, tzinfo=UTC)  # a Tuesday; the evening season opens at 12:00
SEASON = {"policy": "scheduled", "control_interval_s": 0.5, "window_s": 2, "slo": SLO,
          "profiles": {"day": PROFILE, "evening": {**PROFILE, "max_num_seqs": 4, "max_num_batched_tokens": 96}},
          "scheduled": {"default": {"profile": "day", "min_replicas": 2, "max_replicas": 2},
                        "seasons": [{"name": "evening", "start": "12:00", "end": "23:00", "profile": "evening",
                                     "min_replicas": 2, "max_replicas": 2}]}}  # fmt: skip


class FleetLog(logging.Handler):
    """What the fleet logged (its starts, drains and stops)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        logging.getLogger("kvtide.cluster.fleet").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class FakeWall:
    """Real time passing from ``T0``, plus ``shift`` (the season scenario jumps ahead)."""

    def __init__(self) -> None:
        self.start_s = time.monotonic()
        self.shift = timedelta(0)

    def __call__(self) -> datetime:
        return T0 + timedelta(seconds=time.monotonic() - self.start_s) + self.shift


def run(workdir: Path, scenario: str) -> dict:
    model_dir = write_tiny_llama(workdir / "tiny", num_layers=2, max_position=512)
    write_tokenizer(model_dir)
    autoscale = parse_config(REACTIVE if scenario == "reactive" else SEASON)
    floor = 1 if scenario == "reactive" else 2
    cluster = LocalAutoscalingCluster(workdir, head_cpus=floor, worker_cpus=1, max_workers=2)
    cluster.start()
    result: dict = {"scenario": scenario}
    fleet_log = FleetLog()
    runner = LoopThread()
    server = watch = load = None
    try:
        ray.init(address=cluster.address)
        nodes_at_start = sum(1 for n in ray.nodes() if n["Alive"])
        base = ServeConfig(engine=EngineConfig.from_kwargs(model=str(model_dir), device="cpu", num_blocks=64),
                           address=cluster.address, grpc_port=0, http_port=0, drain_timeout_s=30.0,
                           replica_start_timeout_s=180.0, stats_interval_s=0.2)  # fmt: skip
        wall = FakeWall()
        config, profile = serve_config_for(base, autoscale, wall())
        server = Server(config)
        runner.run(server.start(), 600)
        autoscaler = Autoscaler(server, autoscale, profile, wall=wall)
        runner.call(autoscaler.start)
        watch = Watch(runner, autoscaler)
        load = Load(f"{LOOPBACK}:{server.grpc_port}")
        if scenario == "reactive":
            load.add(2)  # steady, through the burst and the drain: at most 2 waiting, never past queue_up
            time.sleep(2)
            burst = load.add(8)
            watch.until(lambda f: ready(f) == 2, "the burst brought a second replica")
            served_before = load.ok
            time.sleep(3)  # the burst goes on over both replicas
            result["served_while_two"] = load.ok - served_before
            burst.set()
            watch.until(lambda f: len(f) == 1 and ready(f) == 1, "the fleet drained back to one replica")
            time.sleep(2)
        else:
            load.add(3)
            time.sleep(3)
            wall.shift = timedelta(hours=1)  # the evening season opens
            watch.until(lambda f: len(f) == 2 and ready(f, "evening") == 2, "the fleet rolled to the evening profile")
            time.sleep(2)
        load.stop_all()
        watch.stop()
        result.update(
            ok=load.ok, failures=load.failures, nodes_at_start=nodes_at_start,
            samples=watch.samples, decisions=runner.call(lambda: autoscaler.loop.num_ticks),
            errors=runner.call(lambda: autoscaler.loop.num_errors), floor=floor,
            failed_starts=runner.call(lambda: autoscaler.fleet.num_failed_starts), fleet_log=fleet_log.lines,
            metrics=runner.call(lambda: server.gateway.metrics.render().decode()),
        )  # fmt: skip
        runner.run(autoscaler.stop(), 60)
    except Exception as exc:  # noqa: BLE001 - reported, with what was seen so far
        result["error"] = repr(exc)
        if watch is not None:
            result["samples"] = watch.samples[-20:]
    finally:
        if load is not None:
            load.stop_all()
        if watch is not None:
            watch.stop()
        if server is not None:
            try:
                runner.run(server.stop(drain_timeout_s=2.0), 120)
            except Exception as exc:  # noqa: BLE001
                result.setdefault("error", f"stop: {exc!r}")
        ray.shutdown()
        cluster.stop()
        result["leftover_pids"] = cluster.pids()
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = run(Path(sys.argv[1]), sys.argv[2])
    print(json.dumps(out))
