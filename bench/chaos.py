"""A bounded chaos soak (issue 15): an in-process ``Server`` (2 replicas, the embedded Redis,
gRPC) on a local multi-node Ray cluster on 127.0.0.1, under steady load from a few concurrent
greedy streams, while it is hurt on a schedule: random SIGKILLs of shard processes, one whole
node removed (``Cluster.remove_node``), Redis stopped and restarted twice, and clients that
cancel their own requests part way.

The head node (the frontend, Redis) has no CPUs for shards; each worker node has one, so each
replica's shard runs on a node of its own, with one spare node (a new one joins after the
removal). Shard kills skip a replica that is not serving and stay under the replica's own
crash-loop breaker (``KILLS_PER_REPLICA`` per 10 minutes).

Every request ends as one of: completed (its tokens are compared with an undisturbed greedy run
of the same prompt, made before the chaos starts), failed with a retryable gRPC code
(UNAVAILABLE, RESOURCE_EXHAUSTED), cancelled by its client, or lost (anything else: another
code, a stream that ended short, or one that hung past its deadline). Migrations are read from
the gateway's counter. Exit code 1 if any request was lost.

    .venv/bin/python bench/chaos.py [--duration 300] [--streams 4] [--model smollm2-135m]
"""

from __future__ import annotations

import os

# NOTE: before Ray is imported: else Ray resolves 127.0.0.1 to the host's external address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import argparse  # noqa: E402
import asyncio  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import grpc  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from kvtide.cluster.client import KvtideClient  # noqa: E402
from kvtide.cluster.serve import Server, ServeConfig  # noqa: E402
from kvtide.cluster.state.redis_server import start_redis  # noqa: E402
from kvtide.workers import EngineConfig  # noqa: E402

LOOPBACK = "127.0.0.1"
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
KILLS_PER_REPLICA = 3
"""Shard kills per replica per 10 minutes: under the replica's breaker (5 failures in 10 min)
with room for the node removal."""
REDIS_DOWN_S = 5.0
PROMPTS = [f"Soak request {i}: write about the {topic}." for i, topic in
           enumerate(["sea", "tide", "moon", "harbour", "storm", "reef", "lighthouse", "shore"])]  # fmt: skip


class Tally:
    """Outcomes, counted from the client threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.lost: list[str] = []
        self.in_flight: dict[int, str] = {}

    def add(self, outcome: str, why: str = "") -> None:
        with self._lock:
            self.counts[outcome] += 1
            if outcome == "lost":
                self.lost.append(why)


def log(t0: float, what: str) -> None:
    print(f"[{time.monotonic() - t0:6.1f} s] {what}", flush=True)


def client_loop(target: str, stream: int, params: dict, reference: dict, stop: threading.Event, tally: Tally,
                rng: random.Random, cancel_fraction: float, deadline_s: float) -> None:  # fmt: skip
    with KvtideClient(target, timeout_s=deadline_s) as client:
        while not stop.is_set():
            prompt = rng.choice(PROMPTS)
            cancel_after = rng.randint(1, params["max_tokens"] - 1) if rng.random() < cancel_fraction else None
            tally.add("sent")
            tally.in_flight[stream] = prompt
            tokens, finish, cancelled = [], "", False
            try:
                call = client.generate(prompt, **params)
                for n, delta in enumerate(call, 1):
                    tokens.extend(delta.token_ids)
                    finish = delta.finish_reason or finish
                    if cancel_after is not None and n >= cancel_after:
                        call.cancel()
                        cancelled = True
                        break
            except grpc.RpcError as exc:
                code = exc.code()
                if code in RETRYABLE:
                    tally.add("retryable")
                    time.sleep(2.0)  # as a client backs off before retrying
                else:
                    tally.add("lost", f"{code.name}: {exc.details()}")
                continue
            finally:
                tally.in_flight.pop(stream, None)
            if cancelled:
                tally.add("cancelled")
            elif len(tokens) == params["max_tokens"] and finish:
                tally.add("completed")
                if tokens != reference[prompt]:
                    tally.add("differs")
            else:
                tally.add("lost", f"the stream ended after {len(tokens)} tokens (finish {finish!r})")


class Chaos:
    """The faults, on the server and the cluster the soak runs."""

    def __init__(self, srv: Server, cluster: Cluster, rng: random.Random, t0: float) -> None:
        self.srv, self.cluster, self.rng, self.t0 = srv, cluster, rng, t0
        self.kills: dict[str, list[float]] = {rid: [] for rid in srv.gateway.replicas.handles}
        self.events: Counter[str] = Counter()

    def _actor(self, rid: str):
        return self.srv.gateway.replicas.handles[rid].actor

    def _serving(self) -> list[str]:
        health = self.srv.supervisor.health()
        return sorted(rid for rid, h in health.items() if h.healthy and h.state.value == "serving")

    def kill_a_shard(self) -> None:
        now = time.monotonic()
        ok = [rid for rid in self._serving() if sum(now - t < 600 for t in self.kills[rid]) < KILLS_PER_REPLICA]
        if not ok:
            log(self.t0, "shard kill skipped: no serving replica under its kill budget")
            return
        rid = self.rng.choice(ok)
        try:
            pids = ray.get(self._actor(rid).shard_pids.remote(), timeout=30)
        except Exception as exc:  # noqa: BLE001 - it is restarting: try later
            log(self.t0, f"shard kill skipped: {rid} did not list its shards ({exc!r})")
            return
        pid = self.rng.choice(sorted(pids.values()))
        os.kill(pid, signal.SIGKILL)
        self.kills[rid].append(now)
        self.events["shard kills"] += 1
        log(self.t0, f"SIGKILL shard pid {pid} of {rid}")

    def _where(self, rid: str) -> set[str]:
        """The nodes a replica runs on: its actor's and its shards'."""
        actor = self._actor(rid)
        nodes = set(ray.get(actor.shard_nodes.remote(), timeout=30).values())
        nodes.add(ray.get(actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()), timeout=30))
        return nodes

    def remove_a_node(self) -> None:
        """A worker node that hosts a serving replica's shard; one whose loss leaves the other
        replica whole if there is one (replica actors need no CPU, so Ray may put both on the
        same node)."""
        where = {}
        for rid in self._serving():
            try:
                where[rid] = self._where(rid)
            except Exception:  # noqa: BLE001 - restarting: not a candidate
                pass
        workers = {n.node_id: n for n in self.cluster.worker_nodes}
        hosts = lambda nid: sorted(rid for rid, nodes in where.items() if nid in nodes)  # noqa: E731
        candidates = [nid for nid in workers if hosts(nid)]
        if not candidates:
            log(self.t0, "node removal skipped: no worker node hosts a serving replica")
            return
        partial = [nid for nid in candidates if len(hosts(nid)) < len(where)]
        nid = self.rng.choice(sorted(partial or candidates))
        self.cluster.remove_node(workers[nid])
        for rid in hosts(nid):
            self.kills[rid].append(time.monotonic())
        self.events["node removals"] += 1
        log(self.t0, f"removed node {nid[:12]} (hosting {', '.join(hosts(nid))})")
        self.cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
        log(self.t0, "a fresh one-CPU node joined")

    def restart_redis(self) -> None:
        old = self.srv._redis
        host, port, password = old.host, old.port, old.password
        old.stop()
        log(self.t0, f"Redis stopped (for {REDIS_DOWN_S:g} s)")
        time.sleep(REDIS_DOWN_S)
        self.srv._redis = start_redis(host, port=port, password=password)
        self.events["redis restarts"] += 1
        log(self.t0, "Redis started again on the same port")


def schedule(duration_s: float, rng: random.Random) -> list[tuple[float, str]]:
    """(seconds from the start, fault): Redis at 1/4 and 3/4, the node at 1/2, shard kills
    every 25-45 s between (none within 10 s of another fault)."""
    fixed = [(0.25 * duration_s, "restart_redis"), (0.5 * duration_s, "remove_a_node"),
             (0.75 * duration_s, "restart_redis")]  # fmt: skip
    kills, t = [], 20.0
    while t < duration_s - 20:
        if all(abs(t - f) > 10 for f, _ in fixed):
            kills.append((t, "kill_a_shard"))
        t += rng.uniform(25, 45)
    return sorted(fixed + kills)


class LoopThread:
    """The server's event loop, on its own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout_s: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load and faults (default 300)")
    p.add_argument("--streams", type=int, default=4, help="concurrent client streams (default 4)")
    p.add_argument("--model", default="smollm2-135m", help="a known model name or a model directory")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (greedy, min_tokens equal)")
    p.add_argument("--cancel-fraction", type=float, default=0.1, help="requests their client cancels part way")
    p.add_argument("--deadline", type=float, default=180.0, help="a request's client deadline, seconds")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for name, value, low in (("duration", args.duration, 60), ("streams", args.streams, 1), ("max-tokens", args.max_tokens, 2)):
        if value < low:
            p.error(f"--{name} must be >= {low}, got {value}")
    if not 0 <= args.cancel_fraction <= 1:
        p.error(f"--cancel-fraction must be within [0, 1], got {args.cancel_fraction}")

    rng = random.Random(args.seed)
    params = {"max_tokens": args.max_tokens, "min_tokens": args.max_tokens, "temperature": 0.0}
    head = {"num_cpus": 0, "node_ip_address": LOOPBACK, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    runner, srv = LoopThread(), None
    try:
        for _ in range(3):  # two replicas' shards and a spare
            cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
        ray.init(address=cluster.address, log_to_driver=False)
        config = ServeConfig(
            num_replicas=2, grpc_port=0, http_port=0, stats_interval_s=0.5,
            engine=EngineConfig.from_kwargs(model=args.model, num_blocks=512, max_model_len=1024, max_num_seqs=8),
        )  # fmt: skip
        srv = Server(config)
        t_start = time.monotonic()
        runner.run(srv.start(), timeout_s=900)
        target = f"{LOOPBACK}:{srv.grpc_port}"
        with KvtideClient(target, timeout_s=args.deadline) as client:
            reference = {prompt: list(client.complete(prompt, **params).token_ids) for prompt in PROMPTS}
        print(f"server up in {time.monotonic() - t_start:.0f} s; {len(PROMPTS)} greedy references made; "
              f"soak of {args.duration:g} s with {args.streams} streams begins", flush=True)  # fmt: skip

        t0 = time.monotonic()
        stop, tally = threading.Event(), Tally()
        threads = [threading.Thread(target=client_loop, daemon=True, args=(
            target, i, params, reference, stop, tally, random.Random(args.seed * 1000 + i), args.cancel_fraction,
            args.deadline)) for i in range(args.streams)]  # fmt: skip
        for t in threads:
            t.start()
        chaos = Chaos(srv, cluster, rng, t0)
        for at_s, fault in schedule(args.duration, rng):
            time.sleep(max(0.0, t0 + at_s - time.monotonic()))
            getattr(chaos, fault)()
        time.sleep(max(0.0, t0 + args.duration - time.monotonic()))
        stop.set()
        log(t0, "load stopped; waiting for the requests in flight")
        for t in threads:
            t.join(args.deadline + 30)
        hung = len(tally.in_flight)
        for _ in range(hung):
            tally.add("lost", "hung: its client thread did not return")

        c = tally.counts
        migrated = int(srv.gateway.metrics.migrations._value.get())
        print()
        routed = sorted(r.replica_id for r in srv.gateway.replicas.routing_status().replicas)
        print(f"chaos: {dict(chaos.events)}; at the end: replica states {srv.supervisor.replica_states()}, "
              f"routed to {routed}")  # fmt: skip
        print(f"requests sent      {c['sent']}")
        print(f"completed          {c['completed']}  ({c['differs']} differ from the undisturbed greedy run)")
        print(f"migrated           {migrated}  (gateway's kvtide:request_migrations)")
        print(f"retryable errors   {c['retryable']}")
        print(f"cancelled          {c['cancelled']}")
        print(f"lost               {c['lost']}")
        for why in Counter(tally.lost).most_common():
            print(f"  lost: {why[1]} x {why[0]}")
        accounted = c["completed"] + c["retryable"] + c["cancelled"] + c["lost"]
        assert accounted == c["sent"], f"{accounted} outcomes for {c['sent']} requests"
        return 1 if c["lost"] else 0
    finally:
        if srv is not None:
            try:
                runner.run(srv.stop(drain_timeout_s=1.0), timeout_s=180)
            except Exception as exc:  # noqa: BLE001 - the cluster still shuts down
                print(f"server stop failed: {exc!r}", file=sys.stderr)
        runner.close()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
