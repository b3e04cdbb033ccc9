"""Routing judged against its ceiling on a real trace: Mooncake's conversation trace replayed
open-loop over simulated replicas (``routing_sim.SimReplica``), and the routing table of
issue 17 that ``routing_sim.py --trace`` and ``routing.py`` print.

**The trace, scaled.** Mooncake's ``hash_ids`` are 512-token prefix blocks; the simulator's
KV blocks are ``BLOCK_SIZE`` (16) tokens. Lengths and the block size are scaled down by one
factor, 512 / 16 = 32, so each trace block becomes one simulated block and the prefix
structure is the trace's own: block ``h`` is the 16 tokens ``h*16 .. h*16+15``, a request's
prompt is its blocks in order, the partial last block cut to ceil(remainder / 32) tokens, and
its reply is ceil(output_length / 32) tokens that no other request shares. Arrivals are the
trace's timestamps divided by ``speedup``.

**Policies.** ``round_robin``, ``least_loaded`` and ``kv_aware`` are the router's own,
fed KV events and loads every ``publish_interval_s`` as the real publisher does.
``true_cache`` is kv_aware's cost on every replica's *true* cache and load at the moment of
each decision (events and loads applied before every ``choose``): what kv_aware would do
without publishing lag. ``oracle`` is the ceiling of prefix routing (issue 17): one replica
with N times the blocks, N times the token budget and a cost model N times faster, i.e. the
N caches and N engines pooled; its hit rate bounds what any routing over N replicas reaches
(up to LRU's own anomalies) and its TTFT is that of perfect pooling.

**TTFT** is simulated: arrival to the end of the engine step that finishes the request's
prefill. A step costs ``base_s + per_decode_row_s * decode_rows + per_prefill_token_s *
prefill_tokens`` (prefill tokens are only the prompt tokens not found in the replica's cache;
waiting for KV room and for earlier steps is the queueing).
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvtide.cluster.bench.traces import Trace
from kvtide.router import CostWeights, ReplicaRegistration, Router
from routing_sim import BLOCK_SIZE, HASH_VERSION, CostModel, SimReplica, SimRequest

TRUE_CACHE = "true_cache"
ORACLE = "oracle"
REPLY_TOKEN_BASE = 1 << 31
"""Reply token ids start here: far above any prompt block's tokens, so replies never match."""


@dataclass(frozen=True)
class SimPrompt:
    arrival_s: float
    prompt: tuple[int, ...]
    num_output_tokens: int


def trace_prompts(trace: Trace, num_requests: int | None = None) -> list[SimPrompt]:
    """The first ``num_requests`` requests of ``trace`` (all when None) as simulated prompts;
    see the module docstring for the scaling."""
    if trace.block_tokens % BLOCK_SIZE:
        raise ValueError(f"block_tokens must be a multiple of the simulator's block size {BLOCK_SIZE}, "
                         f"got {trace.block_tokens}")  # fmt: skip
    if num_requests is not None and not 1 <= num_requests:
        raise ValueError(f"requests must be >= 1, got {num_requests}")
    scale = trace.block_tokens // BLOCK_SIZE
    out = []
    for i, r in enumerate(trace.requests[:num_requests]):
        k = len(r.hash_ids)
        if not (k and (k - 1) * trace.block_tokens < r.isl <= k * trace.block_tokens):
            raise ValueError(f"{trace.name} request {i}: input_length {r.isl} needs "
                             f"{math.ceil(r.isl / trace.block_tokens)} hash_ids of {trace.block_tokens} tokens, "
                             f"got {k}")  # fmt: skip
        prompt = [h * BLOCK_SIZE + j for h in r.hash_ids[:-1] for j in range(BLOCK_SIZE)]
        last = -(-(r.isl - (k - 1) * trace.block_tokens) // scale)
        prompt += [r.hash_ids[-1] * BLOCK_SIZE + j for j in range(last)]
        out.append(SimPrompt(r.arrival_s, tuple(prompt), max(1, -(-r.osl // scale))))
    return out


@dataclass
class TraceRun:
    policy: str
    num_replicas: int
    ttfts_s: list[float] = field(default_factory=list)
    per_replica: dict[str, int] = field(default_factory=dict)
    """Requests served per replica (every replica listed, 0 included); empty for the oracle."""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    wall_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.num_cached_tokens / max(1, self.num_prompt_tokens)


def _reply(index: int, n: int) -> list[int]:
    return [REPLY_TOKEN_BASE + (index * 4099 + j) % (1 << 30) for j in range(n)]


def simulate_trace(policy: str, prompts: Sequence[SimPrompt], num_replicas: int, num_blocks: int, cost: CostModel,
                   *, publish_interval_s: float = 0.1, max_batched_tokens: int = 1024, speedup: float = 1.0,
                   seed: int = 0, temperature: float = 0.02, weights: CostWeights | None = None) -> TraceRun:  # fmt: skip
    """Replay ``prompts`` open-loop (arrival at ``arrival_s / speedup``) over ``num_replicas``
    simulated replicas of ``num_blocks`` KV blocks, routed by ``policy`` (a router policy name,
    ``true_cache`` or ``oracle``)."""
    if policy == ORACLE:
        n = num_replicas
        pooled = CostModel(cost.base_s / n, cost.per_decode_row_s / n, cost.per_prefill_token_s / n,
                           f"{cost.source}, {n}x faster")  # fmt: skip
        run = simulate_trace("round_robin", prompts, 1, num_blocks * n, pooled, publish_interval_s=publish_interval_s,
                             max_batched_tokens=max_batched_tokens * n, speedup=speedup, seed=seed)  # fmt: skip
        run.policy, run.num_replicas, run.per_replica = ORACLE, n, {}
        return run
    if not (speedup > 0 and publish_interval_s > 0):
        raise ValueError(f"speedup and publish_interval_s must be > 0, got {speedup} and {publish_interval_s}")
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    exact = policy == TRUE_CACHE
    now = 0.0
    router = Router("kv_aware" if exact else policy, block_size=BLOCK_SIZE, seed=seed, clock=lambda: now,
                    temperature=temperature, weights=weights or CostWeights())  # fmt: skip
    replicas = {f"r{i:02d}": SimReplica(f"r{i:02d}", num_blocks, max_batched_tokens, cost) for i in range(num_replicas)}
    for rid in replicas:
        router.register(ReplicaRegistration(rid, BLOCK_SIZE, b"", HASH_VERSION, num_blocks, "sim"))
        router.resync(rid, -1, [])
    run = TraceRun(policy, num_replicas, per_replica=dict.fromkeys(replicas, 0))
    heap: list[tuple[float, int, str, object]] = []
    seq = 0

    def push(at: float, kind: str, payload: object) -> None:
        nonlocal seq
        heapq.heappush(heap, (at, seq, kind, payload))
        seq += 1

    def publish() -> None:
        for rid, rep in replicas.items():
            if not router.apply_events(rid, rep.pool.drain_events()):
                snap = rep.pool.snapshot()  # events were dropped: resync as ClusterState does
                router.resync(rid, snap.last_event_id, snap.block_hashes)
            router.update_load(rid, rep.load())

    for i, p in enumerate(prompts):
        push(p.arrival_s / speedup, "arrive", i)
    num_left = len(prompts)
    plans: dict[str, tuple] = {}
    push(publish_interval_s, "publish", None)
    while heap:
        now, _, kind, payload = heapq.heappop(heap)
        if kind == "arrive":
            p = prompts[payload]
            if exact:
                publish()
            d = router.choose(p.prompt, p.num_output_tokens)
            rep = replicas[d.replica_id]
            rep.enqueue(SimRequest(list(p.prompt), _reply(payload, p.num_output_tokens), now, payload))
            if rep.rid not in plans:
                push(now, "step", rep.rid)
        elif kind == "publish":
            publish()
            if num_left:
                push(now + publish_interval_s, "publish", None)
        elif kind == "step":
            rep = replicas[payload]
            if rep.rid in plans:
                continue  # its step_end starts the next step
            plan = rep.start_step(now)
            if plan is not None:
                plans[rep.rid] = plan
                push(plan[0], "step_end", rep.rid)
        else:  # step_end
            rep = replicas[payload]
            _, decode, chunks = plans.pop(rep.rid)
            for r in rep.finish_step(now, decode, chunks):
                router.on_request_finished(rep.rid, len(r.prompt), len(r.reply))
                run.ttfts_s.append(r.first_token_s - r.arrival_s)
                run.num_prompt_tokens += len(r.prompt)
                run.num_cached_tokens += r.num_cached_tokens
                run.per_replica[rep.rid] += 1
                num_left -= 1
            push(now, "step", rep.rid)
    assert num_left == 0, f"{num_left} requests never finished"
    run.wall_s = now
    return run


# ---- the table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TableRow:
    policy: str
    hit_rate: float
    ttfts_s: Sequence[float]
    per_replica: Sequence[int]
    """Requests served per replica; empty where it does not apply (the oracle)."""
    wall_s: float


def pct(xs: Sequence[float], q: float) -> float:
    """The q-quantile by nearest rank (q in [0, 1])."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] if s else float("nan")


def balance(per_replica: Sequence[int]) -> tuple[float, float]:
    """(max/min, max/mean) of the requests served per replica; max/min is inf when a replica
    served none."""
    if not per_replica:
        return float("nan"), float("nan")
    hi, lo, mean = max(per_replica), min(per_replica), statistics.fmean(per_replica)
    return (hi / lo if lo else math.inf), (hi / mean if mean else math.nan)


def goodput(ttfts_s: Sequence[float], slo_s: float, wall_s: float) -> tuple[float, float]:
    """(share of requests whose TTFT is at most ``slo_s``, those requests per second of ``wall_s``)."""
    good = sum(1 for t in ttfts_s if t <= slo_s)
    return good / max(1, len(ttfts_s)), good / wall_s if wall_s > 0 else math.nan


def format_table(title: str, rows: Sequence[TableRow], slo_s: float) -> str:
    """A Markdown table with kv_aware's hit rate as a share of the oracle's, and the verdict
    against issue 17's target (>= 90% of the oracle, max/min <= 1.25, best goodput of
    round_robin / least_loaded / kv_aware)."""
    by = {r.policy: r for r in rows}
    oracle = by.get(ORACLE)
    lines = [f"**{title}**", "",
             f"| policy | hit rate | % of oracle | max/min load | max/mean load | TTFT p50 | TTFT p90 | "
             f"goodput (TTFT <= {slo_s:g} s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        of = f"{r.hit_rate / oracle.hit_rate:.1%}" if oracle and oracle.hit_rate > 0 else "-"
        mm, mx = balance(r.per_replica)
        share, rate = goodput(r.ttfts_s, slo_s, r.wall_s)
        load = (f"{mm:.2f}", f"{mx:.2f}") if r.per_replica else ("-", "-")
        timed = (f"{pct(r.ttfts_s, 0.5):.3f} s", f"{pct(r.ttfts_s, 0.9):.3f} s", f"{share:.1%} ({rate:.2f} req/s)")
        lines.append(f"| {r.policy} | {r.hit_rate:.1%} | {of} | {load[0]} | {load[1]} | "
                     + " | ".join(timed if r.ttfts_s else ("-", "-", "-")) + " |")  # fmt: skip
    kv = by.get("kv_aware")
    contenders = [by[p] for p in ("round_robin", "least_loaded", "kv_aware") if p in by]
    if kv and oracle and len(contenders) == 3:
        of = kv.hit_rate / oracle.hit_rate if oracle.hit_rate > 0 else math.nan
        mm, _ = balance(kv.per_replica)
        shares = {r.policy: goodput(r.ttfts_s, slo_s, r.wall_s)[0] for r in contenders}
        best = max(shares.values())
        lines += ["", f"target: hit rate >= 90% of oracle: {of:.1%} {'met' if of >= 0.9 else 'NOT met'}; "
                      f"max/min load <= 1.25: {mm:.2f} {'met' if mm <= 1.25 else 'NOT met'}; "
                      f"best goodput of the three: kv_aware {shares['kv_aware']:.2%}, "
                      + ", ".join(f"{p} {g:.2%}" for p, g in shares.items() if p != "kv_aware")
                      + f" {'met' if shares['kv_aware'] >= best else 'NOT met'}"]  # fmt: skip
    return "\n".join(lines)


def replay_pooled(requests: Sequence[tuple[Sequence[int], Sequence[int]]], num_blocks: int) -> float:
    """Hit rate of one prefix cache of ``num_blocks`` blocks fed ``requests`` ((prompt, reply)
    token ids) one at a time in order: the oracle of a live run, replayed offline."""
    rep = SimReplica("oracle", num_blocks, 1 << 30, CostModel(1.0, 0.0, 0.0, "unit steps"))
    num_prompt = num_cached = 0
    for i, (prompt, reply) in enumerate(requests):
        r = SimRequest(list(prompt), list(reply), 0.0, i)
        rep.enqueue(r)
        done: list[SimRequest] = []
        while not done:
            plan = rep.start_step(0.0)
            assert plan is not None, "a lone request must be admitted"
            done = rep.finish_step(plan[0], plan[1], plan[2])
        num_prompt += len(prompt)
        num_cached += r.num_cached_tokens
    return num_cached / max(1, num_prompt)

