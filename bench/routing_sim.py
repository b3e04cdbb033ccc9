"""The routing workload of ``bench/routing.py`` replayed over 64 simulated replicas.

Each simulated replica is this engine's scheduling in miniature: a real ``BlockPool`` (prefix
cache with LRU eviction, emitting the real KV events), admission in the engine's queue order
(arrival + ``queue_order_s_per_token`` per uncached prompt token) that reserves a request's
ISL + OSL blocks up front, chunked prefill under a token budget, continuous
batching of decode rows. Its step time comes from a cost model measured on this engine:

    step_s = base_s + per_decode_row_s * num_decode_rows + per_prefill_token_s * num_prefill_tokens

measured by default at the start of the run from a single-process SmolLM2-135M engine on this
machine (``--cost-model FILE`` reuses a saved measurement, ``--save-cost-model FILE`` saves
one). Replicas publish their KV events and load to the router every ``--publish-interval-s``
of simulated time, as the real publisher does; a fresh ``Router`` per policy decides on the
simulated clock. The workload is ``routing.py``'s scaled by 32 (system prompts, users and
clients), so each replica sees what one of the two real replicas sees.

    .venv/bin/python bench/routing_sim.py                      # measures, then ~1 minute
    .venv/bin/python bench/routing_sim.py --cost-model /tmp/cost.json

``--trace FILE`` replays a Mooncake trace instead (``routing_trace.py`` says how it is scaled
and what the ``true_cache`` and ``oracle`` rows are) at each fleet size of ``--replicas`` and
prints issue 17's routing table per size:

    .venv/bin/python bench/routing_sim.py --cost-model /tmp/cost.json \
        --trace ../shared/traces/mooncake_conversation.jsonl --requests 2000 --replicas 8,16,64
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

from kvtide.proto.block_hash import hash_full_blocks
from kvtide.router import CostWeights, ReplicaLoad, ReplicaRegistration, Router
from kvtide.router.policies import policy_names
from kvtide.workers.block_pool import BlockPool
from kvtide.workers.config import SchedulerConfig
from routing_workload import (
    RunStats,
    Workload,
    add_workload_args,
    percentile,
    prefix_stats,
    print_comparison,
    workload_config,
)

HASH_VERSION = 1
BLOCK_SIZE = 16
DEFAULT_POLICIES = "round_robin,least_loaded,kv_aware"


@dataclass(frozen=True)
class CostModel:
    base_s: float
    per_decode_row_s: float
    per_prefill_token_s: float
    source: str

    def step_s(self, num_decode_rows: int, num_prefill_tokens: int) -> float:
        return self.base_s + self.per_decode_row_s * num_decode_rows + self.per_prefill_token_s * num_prefill_tokens


def measure_cost_model() -> CostModel:
    """Median step times of a real single-process engine on one thread (a replica of
    ``routing.py`` has one CPU): decode steps at batch 1, 4 and 16 (a least-squares line), and
    128- vs 512-token prefill steps (the slope is the per-token cost)."""
    from kvtide.cluster.threads import configure_threads

    configure_threads(1)
    from kvtide.workers.engine import Engine
    from kvtide.workers.sampling_params import SamplingParams

    engine = Engine.load("smollm2-135m", num_blocks=512)
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12)

    def prefill_s(n: int) -> float:
        times = []
        for rep in range(3):
            engine.add_request(f"p{n}-{rep}", [1000 + (i * 7 + rep) % 30000 for i in range(n)], SamplingParams(max_tokens=1))
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def decode_s(batch: int) -> float:
        for i in range(batch):
            engine.add_request(f"d{batch}-{i}", [2000 + i, 3000 + i, 4000 + i], params)
        engine.step()  # prefill
        times = []
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    prefill_s(64)  # warm-up: the first steps build the CPU kernel
    decode_s(2)
    p128, p512 = prefill_s(128), prefill_s(512)
    d = {b: decode_s(b) for b in (1, 4, 16)}
    # Least-squares line through the decode step times.
    xs = list(d)
    mx, my = statistics.fmean(xs), statistics.fmean(d.values())
    per_row = max(0.0, sum((x - mx) * (d[x] - my) for x in xs) / sum((x - mx) ** 2 for x in xs))
    per_token = max(1e-6, (p512 - p128) / 384)
    return CostModel(
        base_s=max(0.0, my - per_row * mx), per_decode_row_s=per_row, per_prefill_token_s=per_token,
        source=(f"measured now on this machine: decode step {d[1] * 1e3:.1f}/{d[4] * 1e3:.1f}/{d[16] * 1e3:.1f} ms "
                f"at batch 1/4/16, prefill step {p128 * 1e3:.0f}/{p512 * 1e3:.0f} ms at 128/512 tokens"),
    )


@dataclass
class SimRequest:
    prompt: list[int]
    reply: list[int]
    arrival_s: float
    client: int
    block_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    prefill_left: int = 0
    num_output: int = 0
    first_token_s: float | None = None
    queue_key: float = 0.0


def _queue_key(r: SimRequest) -> float:
    return r.queue_key


class SimReplica:
    def __init__(self, rid: str, num_blocks: int, max_batched_tokens: int, cost: CostModel) -> None:
        self.rid = rid
        self.pool = BlockPool(num_blocks, enable_caching=True)
        self.max_batched_tokens = max_batched_tokens
        self.cost = cost
        self.waiting: list[SimRequest] = []
        self.running: list[SimRequest] = []
        self.queue_order_s_per_token = SchedulerConfig().queue_order_s_per_token

    def enqueue(self, r: SimRequest) -> None:
        """Queue ``r`` as the engine's scheduler does: by arrival + seconds per prompt token not
        already cached (``SchedulerConfig.queue_order_s_per_token``, the engine's default)."""
        r.queue_key = r.arrival_s + self._uncached_tokens(r.prompt) * self.queue_order_s_per_token
        bisect.insort_right(self.waiting, r, key=_queue_key)

    def load(self) -> ReplicaLoad:
        # As the engine counts it: a waiting request's prompt less its cached prefix.
        pending = sum(self._uncached_tokens(r.prompt) for r in self.waiting)
        pending += sum(r.prefill_left for r in self.running)
        return ReplicaLoad(len(self.running), len(self.waiting), self.pool.num_free_blocks, self.pool.num_blocks,
                           self.pool.usage, num_pending_prefill_tokens=pending)  # fmt: skip

    def _uncached_tokens(self, prompt: list[int]) -> int:
        """The prompt tokens a waiting request must still prefill: all but its cached prefix."""
        return len(prompt) - BLOCK_SIZE * len(self._cached_blocks(prompt)[1])

    def _cached_blocks(self, prompt: list[int]) -> tuple[list, list[int]]:
        """(the prompt's full-block hashes, the cached blocks of its leading run), never the
        block of its last token (the engine computes that one for its logits)."""
        hashes = hash_full_blocks(prompt, BLOCK_SIZE)
        cached: list[int] = []
        for h in hashes[: (len(prompt) - 1) // BLOCK_SIZE]:
            b = self.pool.get_cached_block(h)
            if b is None:
                break
            cached.append(b)
        return hashes, cached

    def _admit(self) -> None:
        while self.waiting:
            r = self.waiting[0]
            hashes, cached = self._cached_blocks(r.prompt)
            total = -(-(len(r.prompt) + len(r.reply)) // BLOCK_SIZE)
            if total > self.pool.num_blocks:
                raise ValueError(f"a request needs {total} KV blocks; replica {self.rid} has {self.pool.num_blocks}")
            revived = sum(1 for b in cached if self.pool.ref_count(b) == 0)
            if total - len(cached) > self.pool.num_free_blocks - revived:
                return  # the head waits for room
            self.waiting.pop(0)
            self.pool.touch(cached)
            new = self.pool.allocate(total - len(cached))
            r.block_ids = cached + new
            full = len(hashes)
            self.pool.cache_full_blocks(r.block_ids[len(cached):full], hashes[len(cached):full], hashes[len(cached) - 1] if cached else None)
            r.num_cached_tokens = len(cached) * BLOCK_SIZE
            r.prefill_left = len(r.prompt) - r.num_cached_tokens
            self.running.append(r)

    def start_step(self, now: float) -> tuple[float, list[SimRequest], dict[int, int]] | None:
        """Plan one step; returns (end time, decode rows, prefill chunk per request index)."""
        self._admit()
        if not self.running:
            return None
        budget = self.max_batched_tokens
        decode = [r for r in self.running if r.prefill_left == 0]
        budget -= len(decode)
        chunks: dict[int, int] = {}
        for r in self.running:
            if r.prefill_left and budget > 0:
                n = min(r.prefill_left, budget)
                chunks[id(r)] = n
                budget -= n
        return now + self.cost.step_s(len(decode), sum(chunks.values())), decode, chunks

    def finish_step(self, now: float, decode: list[SimRequest], chunks: dict[int, int]) -> list[SimRequest]:
        done = []
        decoding = {id(r) for r in decode}
        for r in self.running:
            if id(r) in chunks:
                r.prefill_left -= chunks[id(r)]
                if r.prefill_left == 0:
                    r.first_token_s = now
                    r.num_output = 1
            elif id(r) in decoding:
                r.num_output += 1
            if r.num_output >= len(r.reply):
                done.append(r)
        for r in done:
            self.running.remove(r)
            tokens = r.prompt + r.reply
            hashes = hash_full_blocks(tokens, BLOCK_SIZE)
            start = len(r.prompt) // BLOCK_SIZE
            self.pool.cache_full_blocks(r.block_ids[start:len(hashes)], hashes[start:], hashes[start - 1] if start else None)
            self.pool.free(reversed(r.block_ids))
        return done


class SimRun(RunStats):
    def row(self) -> str:
        return (
            f"{self.policy:<13} hit {self.hit_rate:6.1%}  TTFT mean {statistics.fmean(self.ttfts_s):7.3f} s  "
            f"p90 {percentile(self.ttfts_s, 0.9):7.3f} s  {self.num_requests / self.wall_s:6.2f} req/s  "
            f"{self.num_output_tokens / self.wall_s:7.1f} out tok/s  {self.num_prompt_tokens / self.wall_s:8.1f} prompt tok/s"
        )


def simulate(policy: str, workload: Workload, num_replicas: int, num_blocks: int, cost: CostModel,
             publish_interval_s: float, max_batched_tokens: int, seed: int, temperature: float,
             weights: CostWeights) -> SimRun:
    now = 0.0
    router = Router(policy, block_size=BLOCK_SIZE, seed=seed, clock=lambda: now, temperature=temperature, weights=weights)
    replicas = {f"r{i:02d}": SimReplica(f"r{i:02d}", num_blocks, max_batched_tokens, cost) for i in range(num_replicas)}
    for rid in replicas:
        router.register(ReplicaRegistration(rid, BLOCK_SIZE, b"", HASH_VERSION, num_blocks, "sim"))
        router.resync(rid, -1, [])
    cfg = workload.cfg
    run = SimRun(policy)
    users = iter(range(cfg.num_users))
    heap: list[tuple[float, int, str, object]] = []
    seq = 0

    def push(at: float, kind: str, payload: object) -> None:
        nonlocal seq
        heapq.heappush(heap, (at, seq, kind, payload))
        seq += 1

    sessions: dict[int, tuple[int, int, list[list[int]]]] = {}  # client -> (user, turn, replies)
    routed: dict[int, str] = {}
    plans: dict[str, tuple] = {}
    busy: set[str] = set()
    """Replicas with a step in progress."""

    def send(client: int) -> None:
        user, turn, replies = sessions[client]
        prompt = workload.prompt(user, turn, replies)
        req = SimRequest(prompt, workload.fake_reply(user, turn), now, client)
        d = router.choose(prompt, cfg.output_tokens)
        routed[id(req)] = d.replica_id
        rep = replicas[d.replica_id]
        rep.enqueue(req)
        if rep.rid not in busy:
            push(now, "step", rep.rid)

    def next_user(client: int) -> None:
        user = next(users, None)
        if user is not None:
            sessions[client] = (user, 0, [])
            send(client)

    for client in range(cfg.num_clients):
        next_user(client)
    push(publish_interval_s, "publish", None)
    while heap:
        now, _, kind, payload = heapq.heappop(heap)
        if kind == "publish":
            for rid, rep in replicas.items():
                router.apply_events(rid, rep.pool.drain_events())
                router.update_load(rid, rep.load())
            if busy or any(r.waiting or r.running for r in replicas.values()):
                push(now + publish_interval_s, "publish", None)
        elif kind == "step":
            rep = replicas[payload]
            if rep.rid in busy:
                continue  # its step_end starts the next step
            plan = rep.start_step(now)
            if plan is None:
                continue
            busy.add(rep.rid)
            plans[rep.rid] = plan
            push(plan[0], "step_end", rep.rid)
        elif kind == "step_end":
            rep = replicas[payload]
            _, decode, chunks = plans.pop(rep.rid)
            busy.discard(rep.rid)
            for r in rep.finish_step(now, decode, chunks):
                router.on_request_finished(rep.rid, len(r.prompt), len(r.reply))
                run.ttfts_s.append(r.first_token_s - r.arrival_s)
                run.num_prompt_tokens += len(r.prompt)
                run.num_cached_tokens += r.num_cached_tokens
                run.num_output_tokens += len(r.reply)
                run.num_requests += 1
                run.requests.append((r.prompt, r.reply))
                user, turn, replies = sessions[r.client]
                if turn + 1 < cfg.num_turns:
                    sessions[r.client] = (user, turn + 1, [*replies, r.reply])
                    send(r.client)
                else:
                    next_user(r.client)
            push(now, "step", rep.rid)
    run.wall_s = now
    return run


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-replicas", type=int, default=64)
    p.add_argument("--num-blocks", type=int, help="KV blocks per replica: 44 as in routing.py, 2048 with --trace")
    p.add_argument("--max-batched-tokens", type=int, default=1024)
    p.add_argument("--publish-interval-s", type=float, default=0.1)
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   help=f"comma list of {policy_names()} (with --trace also true_cache and oracle, and all five "
                        "by default)")
    p.add_argument("--cost-model", help="JSON from --save-cost-model instead of measuring")
    p.add_argument("--save-cost-model", help="write the measured cost model here")
    p.add_argument("--temperature", type=float, default=0.02, help="kv_aware's softmin temperature")
    p.add_argument("--eviction-weight", type=float, default=CostWeights().eviction_weight, help="see kvtide.router.cost")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", help="replay this Mooncake trace (see routing_trace.py) instead of the chat workload")
    p.add_argument("--requests", type=int, help="with --trace: its first N requests (default all)")
    p.add_argument("--replicas", default="8,16,64", help="with --trace: comma list of fleet sizes")
    p.add_argument("--speedup", type=float,
                   help="with --trace: divide arrival times by this (default N/8 at N replicas: every fleet size "
                        "gets the per-replica load of 8 replicas at the trace's real rate)")
    p.add_argument("--ttft-slo-s", type=float, default=4.0, help="with --trace: the TTFT SLO of the goodput column")
    add_workload_args(p)
    args = p.parse_args()
    if args.trace is not None:
        args.policies = "round_robin,least_loaded,kv_aware,true_cache,oracle" if args.policies == DEFAULT_POLICIES \
            else args.policies
    if args.num_blocks is None:
        args.num_blocks = 2048 if args.trace else 44
    return args



def main() -> None:
    args = parse_args()
    if args.cost_model:
        with open(args.cost_model) as f:
            d = json.load(f)
        cost = CostModel(**{**d, "source": f"read from {args.cost_model} ({d['source']})"})
    else:
        cost = measure_cost_model()
        if args.save_cost_model:
            with open(args.save_cost_model, "w") as f:
                json.dump(asdict(cost), f)
    print(f"cost model: base {cost.base_s * 1e3:.1f} ms + {cost.per_decode_row_s * 1e3:.2f} ms/decode row + "
          f"{cost.per_prefill_token_s * 1e3:.3f} ms/prefill token; {cost.source}")
    if args.trace:
        return main_trace(args, cost)
    factor = max(1, args.num_replicas // 2)
    cfg = workload_config(args).scaled(factor)
    workload = Workload(cfg)
    runs = []
    for policy in args.policies.split(","):
        t = time.perf_counter()
        run = simulate(policy, workload, args.num_replicas, args.num_blocks, cost, args.publish_interval_s,
                       args.max_batched_tokens, args.seed, args.temperature,
                       CostWeights(eviction_weight=args.eviction_weight))
        print(run.row() + f"  (simulated in {time.perf_counter() - t:.1f} s)", flush=True)
        runs.append(run)
    stats = prefix_stats(runs[0].requests, BLOCK_SIZE)
    capacity = args.num_replicas * args.num_blocks
    print(
        f"\nworkload: routing.py's x{factor}: {cfg.num_system_prompts} system prompts x {cfg.system_prompt_tokens} tokens, "
        f"{cfg.num_users} users x {cfg.num_turns} turns, {cfg.num_clients} clients; {runs[0].num_requests} requests "
        f"over {args.num_replicas} replicas x {args.num_blocks} blocks"
    )
    print(
        f"shared prompt tokens (hit rate of one infinite cache): {stats.shared_share:.1%} of {stats.num_prompt_tokens}; "
        f"KV demand: {stats.num_distinct_blocks} distinct blocks = {stats.num_distinct_blocks / capacity:.0%} "
        f"of the fleet's {capacity} blocks"
    )
    print_comparison(runs)


def main_trace(args: argparse.Namespace, cost: CostModel) -> None:
    from kvtide.cluster.bench.traces import read_trace
    from routing_trace import TableRow, format_table, simulate_trace, trace_prompts

    trace = read_trace(args.trace)
    prompts = trace_prompts(trace, args.requests)
    scale = trace.block_tokens // BLOCK_SIZE
    print(f"trace: {trace.name}, first {len(prompts)} of {len(trace.requests)} requests over "
          f"{prompts[-1].arrival_s:.0f} s; lengths and block size / {scale} ({trace.block_tokens} -> {BLOCK_SIZE} "
          f"tokens a block): mean prompt {statistics.fmean(len(p.prompt) for p in prompts):.0f} tokens, mean reply "
          f"{statistics.fmean(p.num_output_tokens for p in prompts):.1f}; {args.num_blocks} KV blocks per replica")
    requests = [(list(p.prompt), []) for p in prompts]
    stats = prefix_stats(requests, BLOCK_SIZE)
    print(f"hit rate of one infinite cache: {stats.shared_share:.1%}; distinct prompt blocks: {stats.num_distinct_blocks}")
    for n in (int(x) for x in args.replicas.split(",")):
        speedup = args.speedup or n / 8
        rows = []
        for policy in args.policies.split(","):
            t = time.perf_counter()
            run = simulate_trace(policy, prompts, n, args.num_blocks, cost, publish_interval_s=args.publish_interval_s,
                                 max_batched_tokens=args.max_batched_tokens, speedup=speedup, seed=args.seed,
                                 temperature=args.temperature,
                                 weights=CostWeights(eviction_weight=args.eviction_weight))  # fmt: skip
            rows.append(TableRow(policy, run.hit_rate, run.ttfts_s, list(run.per_replica.values()), run.wall_s))
            print(f"  {n} replicas, {policy}: simulated {run.wall_s:.0f} s in {time.perf_counter() - t:.1f} s",
                  flush=True)
        print()
        print(format_table(f"{n} simulated replicas, arrivals x{speedup:g}", rows, args.ttft_slo_s))
        print(flush=True)


if __name__ == "__main__":
    main()
