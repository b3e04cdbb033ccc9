"""KV-aware routing on real replicas: 2 SmolLM2-135M ReplicaActors (TP=1; ``--num-replicas``)
on a local Ray cluster on loopback, a shared-prefix chat workload, each routing policy in turn.

The whole serving path except the frontend: each replica publishes its KV events, load and
heartbeat to an embedded Redis (``Replica.start_publishing``); a ``ClusterState`` feeds a
fresh ``Router`` per policy from Redis (resyncing from ``Replica.kv_snapshot``); closed-loop
clients ask ``Router.choose`` and stream from the chosen replica. Each replica has a small KV
cache (``--num-blocks``) that holds about half of the system prompts, so where a request goes
decides whether its prefix is a hit. Caches are cleared between policies. With
``--num-replicas N`` the workload is scaled by N/2 (system prompts, users, clients), so each
replica sees what one of the two default replicas sees.

Prints per policy: prefix-cache hit rate (cached / prompt tokens, as the engine reports it),
mean and p90 TTFT (send to first delta, queueing included), request and token throughput,
and beside them the workload's shared-prefix share and KV demand against capacity. Then issue
17's routing table (``routing_trace.format_table``): hit rate and its share of the oracle's,
max/min and max/mean requests per replica, TTFT p50/p90 and goodput under ``--ttft-slo-s``.
The oracle (one cache with N x the blocks, the ceiling of prefix routing) is not run live: the
first policy's requests, in the order they were sent, are replayed one at a time through one
``BlockPool`` of N x ``--num-blocks`` blocks (``routing_trace.replay_pooled``), so it has a
hit rate and no TTFT.

    .venv/bin/python bench/routing.py            # ~6 minutes on 2 busy cores
    .venv/bin/python bench/routing.py --quick    # a smoke run
"""

from __future__ import annotations

import os

# NOTE: before Ray is imported, or Ray dials the host's external address instead of loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import argparse
import asyncio
import itertools
import statistics
import time
from dataclasses import dataclass, field

import ray

from kvtide.cluster.frontend.cluster_state import ClusterState
from kvtide.cluster.frontend.ray_handles import RayReplicaHandle
from kvtide.cluster.replica.actor import ReplicaActor
from kvtide.cluster.replica.spec import ReplicaSpec
from kvtide.cluster.state.redis_server import start_redis
from kvtide.cluster.state.store import StateStore
from kvtide.router import Router, policy_names
from kvtide.workers import EngineRequest, SamplingParams
from routing_trace import ORACLE, TableRow, format_table, replay_pooled
from routing_workload import (
    RunStats,
    Workload,
    add_workload_args,
    percentile,
    prefix_stats,
    print_comparison,
    workload_config,
)

LOOPBACK = "127.0.0.1"
POLICIES = ["round_robin", "least_loaded", "kv_aware"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: 6 users, 2 turns")
    p.add_argument("--num-replicas", type=int, default=2, help="even; the workload is scaled by N/2")
    p.add_argument("--num-blocks", type=int, default=44, help="KV blocks per replica (16 tokens each)")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma list of {policy_names()}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-slo-s", type=float, default=2.0, help="the TTFT SLO of the table's goodput column")
    add_workload_args(p)
    return p.parse_args()


@dataclass
class PolicyRun(RunStats):
    per_replica: dict[str, int] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)

    def row(self) -> str:
        return (
            f"{self.policy:<13} hit {self.hit_rate:6.1%}  TTFT mean {statistics.fmean(self.ttfts_s):6.3f} s  "
            f"p90 {percentile(self.ttfts_s, 0.9):6.3f} s  {self.num_requests / self.wall_s:5.2f} req/s  "
            f"{self.num_output_tokens / self.wall_s:6.1f} out tok/s  "
            f"{self.num_prompt_tokens / self.wall_s:7.1f} prompt tok/s  "
            f"requests per replica {dict(sorted(self.per_replica.items()))}  decisions by mode {self.modes}"
        )


async def run_policy(policy: str, actors: dict, url: str, workload: Workload, block_size: int, seed: int) -> PolicyRun:
    router = Router(policy, block_size=block_size, seed=seed)
    store = StateStore(url)

    state = ClusterState(router, {rid: RayReplicaHandle(rid, a) for rid, a in actors.items()}, store)
    state.start()
    deadline = time.monotonic() + 30
    while not (router.replica_ids() == sorted(actors) and all(router.mode(r).value == "exact" for r in actors)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas not registered and exact within 30 s: {router.status()}")
        await asyncio.sleep(0.05)

    cfg = workload.cfg
    params = SamplingParams(temperature=0.0, max_tokens=cfg.output_tokens, min_tokens=cfg.output_tokens)
    run = PolicyRun(policy)
    users = iter(range(cfg.num_users))
    request_ids = itertools.count()

    async def one(prompt: list[int]) -> list[int]:
        d = router.choose(prompt, cfg.output_tokens)
        run.per_replica[d.replica_id] = run.per_replica.get(d.replica_id, 0) + 1
        run.modes[d.mode] = run.modes.get(d.mode, 0) + 1
        start = time.perf_counter()
        first = None
        tokens: list[int] = []
        last = None
        request = EngineRequest(f"r{next(request_ids)}", tuple(prompt), params)
        async for ref in actors[d.replica_id].generate.options(num_returns="streaming").remote(request):
            last = await ref
            if first is None:
                first = time.perf_counter() - start
            tokens += last.token_ids
        assert last is not None and last.finish_reason == "length", last
        router.on_request_finished(d.replica_id, len(prompt), len(tokens))
        run.ttfts_s.append(first)
        run.num_prompt_tokens += last.num_prompt_tokens
        run.num_cached_tokens += last.num_cached_tokens
        run.num_output_tokens += len(tokens)
        run.num_requests += 1
        run.requests.append((prompt, tokens))
        return tokens

    async def client() -> None:
        for user in users:
            replies: list[list[int]] = []
            for turn in range(cfg.num_turns):
                replies.append(await one(workload.prompt(user, turn, replies)))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(cfg.num_clients)))
    run.wall_s = time.perf_counter() - start
    await state.stop()
    await store.close()
    return run


async def main_async(args: argparse.Namespace) -> None:
    if args.quick:
        args.num_users, args.num_turns = 6, 2
    cfg = workload_config(args).scaled(max(1, args.num_replicas // 2))
    workload = Workload(cfg)
    block_size = 16
    with start_redis() as redis_server:
        print(f"redis: {redis_server.url}; ray: local on {LOOPBACK}")
        actors = {
            f"replica-{i}": ReplicaActor.options(num_cpus=0).remote(
                ReplicaSpec.load("smollm2-135m", cpus_per_shard=1.0, num_blocks=args.num_blocks, block_size=block_size)
            )
            for i in range(args.num_replicas)
        }
        try:
            warm = SamplingParams(temperature=0.0, max_tokens=2)
            for i, actor in enumerate(actors.values()):  # warm caches; the first step is slower
                request = EngineRequest(f"warm-{i}", tuple(range(1000, 1100)), warm)
                async for ref in actor.generate.options(num_returns="streaming").remote(request):
                    await ref
            regs = await asyncio.gather(*(a.start_publishing.remote(redis_server.url, rid) for rid, a in actors.items()))
            print(f"replicas: {[r.replica_id for r in regs]}, {args.num_blocks} KV blocks x {block_size} tokens each")
            runs = []
            for policy in args.policies.split(","):
                cleared = await asyncio.gather(*(a.reset_prefix_cache.remote() for a in actors.values()))
                assert all(cleared), "a replica was busy when its cache was to be cleared"
                run = await run_policy(policy, actors, redis_server.url, workload, block_size, args.seed)
                print(run.row(), flush=True)
                runs.append(run)
            stats = prefix_stats(runs[0].requests, block_size)
            capacity = args.num_replicas * args.num_blocks
            print(
                f"\nworkload: {cfg.num_system_prompts} system prompts x {cfg.system_prompt_tokens} tokens, "
                f"{cfg.num_users} users x {cfg.num_turns} turns (+{cfg.user_tokens} tokens each, "
                f"{cfg.output_tokens}-token replies), {cfg.num_clients} clients; {runs[0].num_requests} requests"
            )
            print(
                f"shared prompt tokens (hit rate of one infinite cache): {stats.shared_share:.1%} "
                f"of {stats.num_prompt_tokens}; KV demand: {stats.num_distinct_blocks} distinct blocks = "
                f"{stats.num_distinct_blocks / capacity:.0%} of the {capacity} blocks of {args.num_replicas} replicas"
            )
            print_comparison(runs)
            rows = [TableRow(r.policy, r.hit_rate, r.ttfts_s, [r.per_replica.get(rid, 0) for rid in actors], r.wall_s)
                    for r in runs]  # fmt: skip
            rows.append(TableRow(ORACLE, replay_pooled(runs[0].requests, capacity), [], [], 0.0))
            print()
            print(format_table(f"{args.num_replicas} live replicas, {runs[0].num_requests} requests; oracle: one "
                               f"BlockPool of {capacity} blocks replaying {runs[0].policy}'s requests in order",
                               rows, args.ttft_slo_s))  # fmt: skip
        finally:
            await asyncio.gather(*(a.stop_publishing.remote() for a in actors.values()), return_exceptions=True)
            await asyncio.gather(*(a.shutdown.remote() for a in actors.values()), return_exceptions=True)


def main() -> None:
    args = parse_args()
    if args.num_replicas < 2 or args.num_replicas % 2:
        raise SystemExit(f"--num-replicas must be even and >= 2, got {args.num_replicas}")
    # worker_niceness 0: the replicas' shards at normal priority, as kvtide serve starts them.
    ray.init(address="local", num_cpus=args.num_replicas + 2, include_dashboard=False, _node_ip_address=LOOPBACK,
             _system_config={"worker_niceness": 0})  # fmt: skip
    try:
        asyncio.run(main_async(args))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
