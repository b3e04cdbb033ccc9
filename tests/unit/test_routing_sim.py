"""bench/routing_trace.py: the Mooncake replay's scaling, the oracle and the baselines on tiny
hand-computed traces (simulated time only; nothing here measures a clock)."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest

from kvtide.cluster.bench.traces import Trace, TraceRequest

BENCH = Path(__file__).resolve().parents[2] / "bench"
BS = 16  # the simulator's block size; the tiny traces use 16-token trace blocks (scale 1)


@pytest.fixture(scope="module")
def rt():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        yield importlib.import_module("routing_trace")


@pytest.fixture(scope="module")
def unit_cost():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        sim = importlib.import_module("routing_sim")
    return sim.CostModel(1.0, 0.0, 0.0, "every step takes 1 s")


def _trace(*hash_ids: tuple[int, ...], gap_s: float = 10.0, block_tokens: int = BS) -> Trace:
    """Requests of whole blocks (isl = blocks * block_tokens), one output token, ``gap_s`` apart."""
    reqs = tuple(TraceRequest(i * gap_s, len(h) * block_tokens, 1, h) for i, h in enumerate(hash_ids))
    return Trace(reqs, block_tokens, "tiny")


def _run(rt, cost, policy, trace, num_replicas, num_blocks, **kw):
    return rt.simulate_trace(policy, rt.trace_prompts(trace), num_replicas, num_blocks, cost, **kw)


def test_trace_prompts_scale_blocks_and_lengths(rt):
    # 512-token blocks -> 16-token blocks (x32): 1000 tokens = one full block + 488 -> 16 + 16 tokens
    trace = Trace((TraceRequest(2.0, 1000, 65, (7, 9)), TraceRequest(3.0, 1024, 1, (7, 9))), 512, "t")
    a, b = rt.trace_prompts(trace)
    assert a.prompt == tuple(range(7 * 16, 8 * 16)) + tuple(range(9 * 16, 9 * 16 + 16))  # ceil(488/32) = 16
    assert a.num_output_tokens == 3 and b.num_output_tokens == 1  # ceil(65/32), at least 1
    assert a.arrival_s == 2.0 and b.prompt == a.prompt
    short = Trace((TraceRequest(0.0, 513, 1, (1, 2)),), 512, "t")
    assert len(rt.trace_prompts(short)[0].prompt) == 17  # the second block keeps ceil(1/32) = 1 token
    assert len(rt.trace_prompts(_trace((1,), (2,), (3,)), 2)) == 2


@pytest.mark.parametrize("isl,hash_ids", [(1025, (1, 2)), (512, (1, 2)), (10, ())])
def test_trace_prompts_refuse_lengths_that_disagree_with_hash_ids(rt, isl, hash_ids):
    with pytest.raises(ValueError, match=rf"request 0: input_length {isl} needs .* got {len(hash_ids)}"):
        rt.trace_prompts(Trace((TraceRequest(0.0, isl, 1, hash_ids),), 512, "t"))


def test_trace_prompts_refuse_a_block_size_the_simulator_cannot_scale_to(rt):
    with pytest.raises(ValueError, match="block_tokens must be a multiple of .* 16, got 24"):
        rt.trace_prompts(Trace((TraceRequest(0.0, 24, 1, (1,)),), 24, "t"))


# P0, P1 share prefix blocks (1, 2); Q0, Q1 share (3, 4); each has its own third block. A
# 3-block prompt reuses at most its first 2 blocks (the engine computes the last block).
# Each request needs 4 KV blocks (48 prompt + 1 output tokens).
P_THEN_Q = _trace((1, 2, 10), (1, 2, 11), (3, 4, 12), (3, 4, 13))


def test_round_robin_splits_each_prefix_and_small_caches_thrash(rt, unit_cost):
    # r00: P0 then Q0 (which needs all 4 blocks: evicts P); r01: P1 then Q1 (same): no hit at all
    run = _run(rt, unit_cost, "round_robin", P_THEN_Q, 2, 4)
    assert run.num_cached_tokens == 0 and run.num_prompt_tokens == 4 * 48
    assert run.per_replica == {"r00": 2, "r01": 2}
    assert rt.balance(list(run.per_replica.values())) == (1.0, 1.0)


def test_oracle_pools_the_caches_of_all_replicas(rt, unit_cost):
    # one cache of 2 x 4 blocks holds P and Q: P1 and Q1 each hit 2 blocks = 64 of 192 tokens
    run = _run(rt, unit_cost, "oracle", P_THEN_Q, 2, 4)
    assert run.policy == "oracle" and run.num_replicas == 2 and run.per_replica == {}
    assert run.num_cached_tokens == 2 * 2 * BS
    assert run.hit_rate == pytest.approx(1 / 3)


@pytest.mark.parametrize("policy", ["kv_aware", "true_cache"])
def test_kv_aware_reaches_the_oracle_by_partitioning_prefixes(rt, unit_cost, policy):
    # P1 follows P0 (cached); Q0 goes to the other replica, where it evicts nothing; Q1 follows
    run = _run(rt, unit_cost, policy, P_THEN_Q, 2, 4, publish_interval_s=0.1)
    assert run.num_cached_tokens == 2 * 2 * BS
    assert sorted(run.per_replica.values()) == [2, 2]


def test_true_cache_sees_a_prefix_that_the_lagging_kv_aware_has_not_heard_of(rt, unit_cost):
    # Two requests of one prefix arrive 0.5 s apart (the first is still prefilling); events
    # publish every 100 s. kv_aware has no events yet and spreads them (its in-flight count
    # breaks the tie); true_cache reads the true cache and keeps them together, hitting the 2
    # shared blocks.
    trace = _trace((1, 2, 10), (1, 2, 11), gap_s=0.5)
    lagging = _run(rt, unit_cost, "kv_aware", trace, 2, 64, publish_interval_s=100.0)
    exact = _run(rt, unit_cost, "true_cache", trace, 2, 64, publish_interval_s=100.0)
    assert lagging.num_cached_tokens == 0
    assert exact.num_cached_tokens == 2 * BS and sorted(exact.per_replica.values()) == [0, 2]


def test_least_loaded_spreads_simultaneous_arrivals(rt, unit_cost):
    # four requests of one prefix at t=0: least_loaded alternates (in-flight counts), so each
    # replica gets two and the second on each hits the 2 blocks the first registered
    run = _run(rt, unit_cost, "least_loaded", _trace((1, 2, 10), (1, 2, 11), (1, 2, 12), (1, 2, 13), gap_s=0.0), 2, 64)
    assert run.per_replica == {"r00": 2, "r01": 2}
    assert run.num_cached_tokens == 2 * 2 * BS


def test_ttft_is_arrival_to_the_step_that_ends_prefill(rt, unit_cost):
    # one replica, unit steps: the two simultaneous requests prefill in the first step
    run = _run(rt, unit_cost, "round_robin", _trace((1, 2, 10), (1, 2, 11), gap_s=0.0), 1, 64)
    assert run.ttfts_s == [1.0, 1.0]


def test_replay_pooled_is_one_lru_cache_in_order(rt):
    p = list(range(1000, 1048))  # 3 blocks; 2 reusable
    q = list(range(2000, 2048))
    reply = [5]
    # 4 blocks: p, then q evicts p, then p misses again; 8 blocks: the second p hits 32 tokens
    assert rt.replay_pooled([(p, reply), (q, reply), (p, reply)], 4) == 0.0
    assert rt.replay_pooled([(p, reply), (q, reply), (p, reply)], 8) == pytest.approx(32 / 144)


def test_table_helpers(rt):
    assert rt.balance([3, 1, 2]) == (3.0, 1.5)
    assert rt.balance([2, 0])[0] == math.inf
    assert rt.goodput([0.5, 1.0, 2.0, 3.0], 1.0, 4.0) == (0.5, 0.5)
    assert rt.pct([4.0, 1.0, 3.0, 2.0], 0.5) == 2.0 and rt.pct([4.0, 1.0, 3.0, 2.0], 0.9) == 4.0
    rows = [rt.TableRow("round_robin", 0.1, [1.0, 5.0], [1, 1], 10.0),
            rt.TableRow("least_loaded", 0.1, [1.0, 5.0], [1, 1], 10.0),
            rt.TableRow("kv_aware", 0.19, [1.0, 1.0], [1, 1], 10.0),
            rt.TableRow("oracle", 0.2, [1.0, 1.0], [], 10.0)]  # fmt: skip
    table = rt.format_table("t", rows, 2.0)
    assert "| kv_aware | 19.0% | 95.0% | 1.00 | 1.00 |" in table
    assert "| oracle | 20.0% | 100.0% | - | - |" in table
    assert "95.0% met; max/min load <= 1.25: 1.00 met; best goodput of the three: kv_aware 100.00%, round_robin 50.00%, least_loaded 50.00% met" in table


def test_bad_arguments_are_refused(rt, unit_cost):
    with pytest.raises(ValueError, match="speedup and publish_interval_s must be > 0, got 0.0"):
        _run(rt, unit_cost, "round_robin", P_THEN_Q, 2, 4, speedup=0.0)
    with pytest.raises(ValueError, match="unknown routing policy 'nope'"):
        _run(rt, unit_cost, "nope", P_THEN_Q, 2, 4)


def test_sim_replica_queues_in_the_engine_order(unit_cost):
    """Like the engine's scheduler: arrival + seconds per uncached prompt token, so of requests
    arriving together the shortest uncached prefill is admitted first."""
    sim = importlib.import_module("routing_sim")
    rep = sim.SimReplica("r", 64, 1 << 10, unit_cost)
    assert rep.queue_order_s_per_token == pytest.approx(0.001)  # the engine's default
    cached = list(range(100, 100 + 4 * BS))
    rep.enqueue(sim.SimRequest(cached, [1], 0.0, 0))
    plan = rep.start_step(0.0)
    rep.finish_step(plan[0], plan[1], plan[2])  # one output token: done, its blocks cached
    long = sim.SimRequest(list(range(1000, 1000 + 3 * BS)), [1], 1.0, 1)  # 48 uncached tokens
    hit = sim.SimRequest(cached + [7], [1], 1.0, 2)  # 65 tokens, 64 of them cached
    short = sim.SimRequest(list(range(2000, 2000 + BS)), [1], 1.0, 3)  # 16 uncached
    for r in (long, hit, short):
        rep.enqueue(r)
    assert [r.client for r in rep.waiting] == [2, 3, 1]
    late = sim.SimRequest([5, 6], [1], 1.1, 4)  # key 1.102 > long's 1.048: it does not pass it
    rep.enqueue(late)
    assert [r.client for r in rep.waiting] == [2, 3, 1, 4]
