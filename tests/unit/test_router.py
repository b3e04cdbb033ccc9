"""Router: who gets chosen and why, exact vs approximate mode, gaps and resync, registration."""

from __future__ import annotations

import pytest

from kvtide.proto import AllBlocksCleared, BlocksRemoved, BlocksStored, hash_full_blocks
from kvtide.proto.block_hash import HASH_VERSION
from kvtide.router import (
    NoReplicaError,
    ReplicaLoad,
    ReplicaRegistration,
    RouteDecision,
    Router,
    RoutingMode,
)

BS = 4
SEED = b"test"


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def reg(rid: str, **kw) -> ReplicaRegistration:
    base = {"replica_id": rid, "block_size": BS, "hash_seed": SEED, "hash_version": HASH_VERSION, "num_blocks": 64, "model": "m"}
    return ReplicaRegistration(**{**base, **kw})


def idle(num_free_blocks: int = 64) -> ReplicaLoad:
    return ReplicaLoad(num_running=0, num_waiting=0, num_free_blocks=num_free_blocks, num_total_blocks=64, kv_cache_usage=0.0)


def make_router(n: int = 2, policy: str = "kv_aware", **kw) -> tuple[Router, FakeClock]:
    clock = FakeClock()
    router = Router(policy, block_size=BS, hash_seed=SEED, seed=0, clock=clock, **kw)
    for i in range(n):
        router.register(reg(f"r{i}"))
        router.resync(f"r{i}", -1, [])  # fresh replicas: empty caches, exact
    return router, clock


PROMPT = list(range(100, 117))  # 17 tokens: 4 full blocks and one token over
HASHES = hash_full_blocks(PROMPT, BS, seed=SEED)


def test_kv_aware_sends_a_prompt_to_the_replica_holding_its_prefix():
    router, _ = make_router(3)
    assert router.apply_events("r2", [BlocksStored(0, tuple(HASHES[:3]), None)])
    d = router.choose(PROMPT, max_tokens=8)
    assert d == RouteDecision("r2", cached_blocks=3, cost=(17 - 12) * 1.0, mode="exact")


def test_only_a_leading_run_of_blocks_counts():
    router, _ = make_router(2, temperature=0.0)
    router.apply_events("r0", [BlocksStored(0, tuple(HASHES[1:4]), HASHES[0])])  # no block 0
    router.apply_events("r1", [BlocksStored(0, (HASHES[0],), None)])
    assert router.choose(PROMPT, 8) == RouteDecision("r1", 1, 13.0, "exact")
    # r1 now has a request in flight that its load report does not show, costed at the mean
    # new prefill so far (17 + 0.05 * (13 - 17) = 16.8): 13 + 0.25 * 16.8 = 17.2 > 17.
    assert router.choose(PROMPT, 8) == RouteDecision("r0", 0, 17.0, "exact")


def test_the_block_holding_the_last_prompt_token_is_never_counted_as_cached():
    router, _ = make_router(1)
    prompt = PROMPT[:16]  # exactly 4 blocks, all cached: the engine still computes the last
    router.apply_events("r0", [BlocksStored(0, tuple(HASHES), None)])
    assert router.choose(prompt, 8).cached_blocks == 3


def test_removed_and_cleared_events_take_blocks_out():
    router, _ = make_router(1)
    router.apply_events("r0", [BlocksStored(0, tuple(HASHES), None), BlocksRemoved(1, (HASHES[2],))])
    assert router.choose(PROMPT, 8).cached_blocks == 2
    assert router.status().replica("r0").blocks_indexed == 3
    router.apply_events("r0", [AllBlocksCleared(2)])
    assert router.choose(PROMPT, 8).cached_blocks == 0
    assert router.status().replica("r0").blocks_indexed == 0


def test_load_outweighs_a_short_cached_prefix():
    router, _ = make_router(2)
    router.apply_events("r0", [BlocksStored(0, (HASHES[0],), None)])
    router.update_load("r0", ReplicaLoad(4, 2, 50, 64, 0.2))
    # r0: 13 + 8 * 4 + 256 * 2 = 557; r1: 17
    assert router.choose(PROMPT, 8) == RouteDecision("r1", 0, 17.0, "exact")


def test_kv_room_decides_between_equally_cold_replicas():
    router, _ = make_router(2)
    router.update_load("r0", idle(num_free_blocks=2))  # the request needs ceil(25 / 4) = 7
    d = router.choose(PROMPT, max_tokens=8)
    assert (d.replica_id, d.cost) == ("r1", 17.0)


def test_requests_in_flight_spread_a_burst_before_load_reports_arrive():
    router, _ = make_router(2)
    first = router.choose(PROMPT, 8).replica_id
    second = router.choose(PROMPT, 8).replica_id
    assert {first, second} == {"r0", "r1"}
    assert router.status().replica(first).in_flight == 1
    router.on_request_finished(first, 17, 8)
    assert router.status().replica(first).in_flight == 0
    assert router.choose(PROMPT, 8).replica_id == first


def test_equal_replicas_share_the_load():
    router, _ = make_router(2)
    chosen = []
    for _ in range(200):
        d = router.choose([7] * 3, 8)  # no full block: nothing to cache
        router.on_request_finished(d.replica_id, 3, 8)
        chosen.append(d.replica_id)
    assert 70 < chosen.count("r0") < 130


def test_a_gap_in_event_ids_asks_for_a_resync_and_old_events_are_skipped_after_it():
    router, _ = make_router(1)
    assert router.apply_events("r0", [BlocksStored(0, (HASHES[0],), None)])
    assert not router.apply_events("r0", [BlocksStored(2, (HASHES[2],), HASHES[1])])  # 1 missing
    assert router.mode("r0") is RoutingMode.APPROXIMATE
    assert not router.apply_events("r0", [BlocksStored(3, (HASHES[3],), HASHES[2])])  # still unsynced
    router.resync("r0", 2, HASHES[:3])
    assert router.mode("r0") is RoutingMode.EXACT
    # 2 is in the snapshot; 3 is replayed (its block may be in the snapshot too: idempotent).
    assert router.apply_events("r0", [BlocksStored(2, (HASHES[2],), HASHES[1]), BlocksStored(3, (HASHES[3],), HASHES[2])])
    assert router.status().replica("r0").next_event_id == 4
    assert router.choose(PROMPT, 8).cached_blocks == 4


def test_a_replica_first_seen_mid_stream_needs_a_snapshot():
    router, _ = make_router(0)
    router.register(reg("r0"))
    assert router.mode("r0") is RoutingMode.APPROXIMATE
    assert not router.apply_events("r0", [BlocksRemoved(57, (HASHES[0],))])
    assert router.apply_events("r0", [])  # nothing seen, nothing missed
    assert router.mode("r0") is RoutingMode.APPROXIMATE
    router.resync("r0", 57, [HASHES[1]])
    assert router.mode("r0") is RoutingMode.EXACT
    assert router.choose(PROMPT, 8).cached_blocks == 0  # block 1 without block 0 is no prefix


def test_a_fresh_replica_syncs_from_its_first_event():
    router, _ = make_router(0)
    router.register(reg("r0"))
    assert router.apply_events("r0", [BlocksStored(0, (HASHES[0],), None)])
    assert router.mode("r0") is RoutingMode.EXACT


def test_without_events_the_router_goes_approximate_and_remembers_its_own_decisions():
    router, clock = make_router(2, approx_ttl_s=60.0, sync_timeout_s=3.0)
    clock.t += 3.5  # no apply_events for longer than sync_timeout_s
    assert [router.mode(r) for r in ("r0", "r1")] == [RoutingMode.APPROXIMATE] * 2
    first = router.choose(PROMPT, 8)
    assert (first.cached_blocks, first.mode) == (0, "approximate")
    router.on_request_finished(first.replica_id, 17, 8)
    again = router.choose(PROMPT, 8)  # the guess: the first request left its prefix there
    assert (again.replica_id, again.cached_blocks) == (first.replica_id, 4)
    router.on_request_finished(again.replica_id, 17, 8)
    assert router.status().replica(first.replica_id).blocks_guessed == 4
    clock.t += 61.0  # the guesses expire
    late = router.choose(PROMPT, 8)
    assert late.cached_blocks == 0
    assert router.status().replica(late.replica_id).blocks_guessed == 4  # recorded anew


def test_events_resuming_without_a_gap_return_to_exact_mode_and_drop_nothing():
    router, clock = make_router(1, sync_timeout_s=3.0)
    router.apply_events("r0", [BlocksStored(0, (HASHES[0],), None)])
    clock.t += 10
    assert router.status().replica("r0").exact == 0
    assert router.apply_events("r0", [BlocksStored(1, (HASHES[1],), HASHES[0])])
    status = router.status().replica("r0")
    assert (status.mode, status.exact, status.blocks_indexed) == ("exact", 1, 2)


def test_guesses_are_capped_at_the_replica_cache_size():
    router, _clock = make_router(0)
    router.register(reg("r0", num_blocks=6))
    for start in (0, 1000, 2000):
        router.choose(list(range(start, start + 9)), 8)  # 2 full blocks each
    assert router.status().replica("r0").blocks_guessed == 6
    router.choose(list(range(3000, 3009)), 8)
    assert router.status().replica("r0").blocks_guessed == 6
    assert router.choose(list(range(9)), 8).cached_blocks == 0  # the oldest went first


@pytest.mark.parametrize(
    ("field", "value", "ours"),
    [("block_size", 16, "4"), ("hash_seed", b"other", "b'test'"), ("hash_version", HASH_VERSION + 1, str(HASH_VERSION))],
)
def test_registration_must_hash_like_the_router(field, value, ours):
    router, _ = make_router(0)
    with pytest.raises(ValueError, match=rf"replica 'rx' registered {field}={value!r} but this router uses {field}={ours}"):
        router.register(reg("rx", **{field: value}))
    assert router.replica_ids() == []


def test_reregistering_is_a_heartbeat_but_a_new_incarnation_starts_over():
    router, _ = make_router(1)
    router.apply_events("r0", [BlocksStored(0, (HASHES[0],), None)])
    router.register(reg("r0"))
    assert router.status().replica("r0").blocks_indexed == 1
    router.register(reg("r0", incarnation="restarted"))
    status = router.status().replica("r0")
    assert (status.blocks_indexed, status.mode, status.next_event_id) == (0, "approximate", None)


def test_no_replica_left_raises():
    router, _ = make_router(2)
    with pytest.raises(NoReplicaError, match="no replica to route to: 2 registered, 2 of them excluded"):
        router.choose(PROMPT, 8, exclude={"r0", "r1"})
    assert router.choose(PROMPT, 8, exclude={"r0"}).replica_id == "r1"
    router.unregister("r0")
    router.unregister("r1")
    router.unregister("r1")
    with pytest.raises(NoReplicaError, match="0 registered"):
        router.choose(PROMPT, 8)


def test_round_robin_cycles_in_id_order_and_skips_excluded():
    router, _ = make_router(3, policy="round_robin")
    router.apply_events("r2", [BlocksStored(0, tuple(HASHES), None)])  # ignored by this policy
    picks = [router.choose(PROMPT, 8).replica_id for _ in range(4)]
    assert picks == ["r0", "r1", "r2", "r0"]
    assert router.choose(PROMPT, 8, exclude={"r1"}).replica_id == "r2"


def test_least_loaded_counts_running_waiting_and_in_flight():
    router, _ = make_router(3, policy="least_loaded")
    router.update_load("r0", ReplicaLoad(1, 0, 64, 64, 0.1))
    router.update_load("r1", ReplicaLoad(0, 0, 10, 64, 0.8))
    router.update_load("r2", ReplicaLoad(0, 0, 60, 64, 0.1))
    assert router.choose(PROMPT, 8).replica_id == "r2"  # tie with r1 on requests; more free blocks
    assert router.choose(PROMPT, 8).replica_id == "r1"  # r2 now has one in flight
    assert router.status().policy == "least_loaded"


def test_unknown_policy_and_unknown_replica_errors_name_what_exists():
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'; known policies: kv_aware, least_loaded, round_robin"):
        Router("fastest", block_size=BS)
    router, _ = make_router(1)
    with pytest.raises(KeyError, match=r"replica 'r9' is not registered; registered: \['r0'\]"):
        router.apply_events("r9", [])
    with pytest.raises(ValueError, match="block_size must be positive, got 0"):
        Router(block_size=0)


def test_a_cold_prompt_goes_where_it_evicts_the_fewest_cached_blocks():
    router, _ = make_router(2)
    router.register(reg("r0", num_blocks=8))
    router.register(reg("r1", num_blocks=8))
    other = hash_full_blocks(list(range(500, 524)), BS, seed=SEED)  # 6 blocks of another prefix
    router.apply_events("r0", [BlocksStored(0, tuple(other), None)])
    router.apply_events("r1", [BlocksStored(0, tuple(other[:2]), None)])
    # Needs ceil(25 / 4) = 7 blocks; both have 8 free, r0 only 2 empty (5 evicted), r1 6 (1).
    d = router.choose(PROMPT, max_tokens=8)
    assert d == RouteDecision("r1", 0, 17 + 0.5 * 4 * 1, "exact")


def test_a_queued_request_costs_the_tokens_it_must_still_prefill():
    router, _ = make_router(2, temperature=0.0)
    router.apply_events("r0", [BlocksStored(0, tuple(HASHES), None)])
    router.update_load("r0", ReplicaLoad(0, 1, 64, 64, 0.0, num_pending_prefill_tokens=20))
    # r0 holds the prefix (1 token to prefill) but 20 queued ahead: 1 + 0.25 * 20 = 6 < 17.
    assert router.choose(PROMPT, 8) == RouteDecision("r0", 4, 6.0, "exact")
    router.on_request_finished("r0", 17, 8)
    # One long prompt queued counts as its length, not as one request: 1 + 0.25 * 400 > 17.
    router.update_load("r0", ReplicaLoad(0, 1, 64, 64, 0.0, num_pending_prefill_tokens=400))
    assert router.choose(PROMPT, 8) == RouteDecision("r1", 0, 17.0, "exact")


def test_requests_sent_since_the_last_report_cost_the_mean_new_prefill():
    router, _ = make_router(2, temperature=0.0)
    router.apply_events("r0", [BlocksStored(0, tuple(HASHES), None)])
    # r0 costs 1 + 0.25 * in_flight * mean, the mean seeded at 17 and moving 5% towards each
    # decision's new prefill (1): 1, 5.05, 8.72, 12.04, 15.03, then 1 + 0.25 * 5 * 13.38 > 17.
    for _ in range(5):
        assert router.choose(PROMPT, 8).replica_id == "r0"
    assert router.status().replica("r0").in_flight == 5
    assert router.choose(PROMPT, 8) == RouteDecision("r1", 0, 17.0, "exact")
