"""The fleet simulator on tiny traces with hand-checked answers, the action planner's rolls,
the metrics window, and the day-trace builder's determinism."""

from __future__ import annotations

import gzip
import importlib
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kvtide.cluster.autoscaler.actions import ReplicaView, plan_actions
from kvtide.cluster.autoscaler.config import parse_config
from kvtide.cluster.autoscaler.cost_model import EngineCostModel
from kvtide.cluster.autoscaler.observation import Target
from kvtide.cluster.autoscaler.registry import make_policy
from kvtide.cluster.autoscaler.window import MetricsWindow, weighted_percentiles

BENCH = Path(__file__).resolve().parents[2] / "bench"
# A step costs 0.1 s plus 10 ms per prefill token; decode rows and attention are free.
COST = EngineCostModel(base_s=0.1, per_decode_row_s=0.0, per_prefill_token_s=0.01)


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        yield {name: importlib.import_module(name) for name in ("fleet_core", "fleet_report", "day_trace")}


@pytest.fixture(scope="module")
def services(bench):
    return bench["day_trace"].load_services()


@pytest.fixture(scope="module")
def day0(bench, services):
    return bench["day_trace"].build_day(services, 0)


def _config(**extra):
    return parse_config({
        "policy": "static", "cold_start_s": 10.0, "control_interval_s": 30.0, "window_s": 60.0,
        "slo": {"ttft_p90_s": 5.0, "itl_p90_s": 0.5},
        "profiles": {"p": {"max_model_len": 1024, "max_num_seqs": 4, "max_num_batched_tokens": 100,
                           "max_prefill_chunk": 100}},
        "static": {"profile": "p", "replicas": 1}, **extra,
    })


def _run(bench, arrivals, config=None):
    config = config or _config()
    settings = bench["fleet_core"].SimSettings(start=datetime(2024, 3, 5, tzinfo=UTC), cost=COST,
                                               kv_tokens={"p": 4096}, tail_s=600.0)
    return bench["fleet_core"].FleetSim(config, make_policy(config.policy, config), settings).run(arrivals, "t")


def test_a_tiny_trace_gives_the_hand_checked_times(bench):
    result = _run(bench, [(0.0, 100, 1), (20.0, 50, 3), (30.0, 200, 1), (30.0, 200, 1)])
    r0, r1, r2, r3 = result.requests
    # The day starts warm: the replica is up at t=0 and r0 takes one 1.1 s step.
    assert (r0.admitted_s, r0.first_token_s, r0.finished_s) == pytest.approx((0.0, 1.1, 1.1))
    # r1: a 0.6 s prefill step, then two decode steps of 0.1 s.
    assert (r1.first_token_s, r1.finished_s) == pytest.approx((20.6, 20.8))
    # r2 and r3 arrive together: 100-token chunks, one per step (the budget), FCFS.
    assert r2.first_token_s == pytest.approx(32.2) and r3.first_token_s == pytest.approx(34.4)
    assert result.itl == [pytest.approx((20.8, 0.1, 2))]
    assert result.gpu_hours() == pytest.approx(24.0)  # one replica from t=0, clipped to the day
    assert (result.refused, result.timed_out, result.unfinished) == (0, 0, 0)


def test_a_request_waits_for_a_cold_start_at_the_gateway(bench):
    sim = bench["fleet_core"]
    settings = sim.SimSettings(start=datetime(2024, 3, 5, tzinfo=UTC), cost=COST, kv_tokens={"p": 4096})
    config = _config(static={"profile": "p", "replicas": 0})
    fleet = sim.FleetSim(config, make_policy("static", config), settings)
    fleet.control(0.0)
    assert not fleet.replicas
    fleet.policy = make_policy("static", _config())
    fleet.control(100.0)  # asks for one replica: ready at 110 (cold start 10 s)
    request = sim.Request(0, 100.5, 100, 1)
    fleet.arrive(request, 100.0)
    for now in range(100, 115):
        fleet.sync(float(now), now + 1.0)
        if now < 110:
            assert list(fleet.pending) == [request]
    assert (request.admitted_s, request.first_token_s) == pytest.approx((110.0, 111.1))
    assert fleet.replicas["r0000"].started_s == 100.0  # paid from the moment it was asked for


def test_the_report_counts_windows_and_drops(bench):
    # A 2000-token request fits no profile (max_model_len 1024): refused, and its window misses.
    result = _run(bench, [(0.0, 100, 1), (400.0, 50, 3), (700.0, 2000, 10)])
    assert result.refused == 1
    stats = [w for w in bench["fleet_report"].window_stats(result, 300.0) if w.num_requests]
    assert [(w.start_s, w.num_requests) for w in stats] == [(0.0, 1), (300.0, 1), (600.0, 1)]
    assert stats[0].ttft_p90_s == pytest.approx(1.1) and math.isinf(stats[2].ttft_p90_s)
    # A season boundary at 4000 s: the window at 600 s is within the hour before it, the one at 0 is not.
    s = bench["fleet_report"].summarize(result, _config(), 300.0, 2.0, [4000.0])
    assert s.ttft_attainment == pytest.approx(2 / 3)  # 1.1 s and 0.6 s are within the SLO (5 s); refused
    assert (s.dropped, s.ttft_misses, s.season_misses) == (1, 1, 1)
    assert s.usd == pytest.approx(48.0)


def test_a_scale_down_drains_without_losing_requests(bench):
    """Four replicas, one busy; the target drops to zero: the idle three stop at once, the busy
    one takes no new request, finishes its own, then stops."""
    config = _config(static={"profile": "p", "replicas": 4})
    sim = bench["fleet_core"]
    settings = sim.SimSettings(start=datetime(2024, 3, 5, tzinfo=UTC), cost=COST, kv_tokens={"p": 4096}, tail_s=60.0)
    fleet = sim.FleetSim(config, make_policy("static", config), settings)
    fleet.control(0.0)
    request = sim.Request(0, 39.5, 500, 50)
    for now in range(40):
        if now == 39:
            fleet.arrive(request, float(now))
        fleet.sync(float(now), now + 1.0)
    fleet.policy = make_policy("static", _config(static={"profile": "p", "replicas": 0}))
    fleet.control(40.0)
    assert {r.state for r in fleet.replicas.values()} == {"draining"}
    late = sim.Request(1, 40.5, 10, 1)
    fleet.arrive(late, 40.0)
    for now in range(40, 100):
        fleet.sync(float(now), now + 1.0)
    assert not fleet.replicas and len(fleet.spans) == 4
    # 500 prompt tokens in 5 steps of 1.1 s from 39.5, then 49 decode steps of 0.1 s.
    assert request.first_token_s == pytest.approx(45.0) and request.finished_s == pytest.approx(49.9)
    assert sorted(stop for _, stop, _ in fleet.spans) == [41.0, 41.0, 41.0, 50.0]
    assert list(fleet.pending) == [late]  # nothing takes new requests while everything drains


def test_plan_rolls_profiles_make_before_break():
    old = [ReplicaView(f"o{i}", "old", "ready", num_in_flight=i) for i in range(4)]
    target = Target({"new": 4}, "season turned")
    first = plan_actions(old, target)
    assert dict(first.start) == {"new": 4} and first.drain == ()  # nothing drains before new ones are ready
    two_ready = old + [ReplicaView(f"n{i}", "new", "ready" if i < 2 else "starting") for i in range(4)]
    second = plan_actions(two_ready, target)
    assert second.drain == ("o0", "o1") and not second.start  # the least loaded old ones, two for two
    shrink = plan_actions([ReplicaView(f"n{i}", "new", "ready", num_in_flight=5 - i) for i in range(4)],
                          Target({"new": 1}, ""))
    assert shrink.drain == ("n3", "n2", "n1")


def test_plan_cancels_starting_and_undrains_before_starting_new():
    fleet = [ReplicaView("a", "p", "ready"), ReplicaView("b", "p", "starting", started_s=5.0),
             ReplicaView("c", "p", "starting", started_s=9.0), ReplicaView("d", "p", "draining")]
    assert plan_actions(fleet, Target({"p": 2}, "")).cancel == ("c",)
    up = plan_actions(fleet, Target({"p": 5}, ""))
    assert up.undrain == ("d",) and dict(up.start) == {"p": 1}


def test_metrics_window_summarizes_the_last_window_only():
    w = MetricsWindow(60.0)
    w.arrived(0.0, 999)
    for t in (30.0, 50.0, 70.0):
        w.arrived(t, 100)
        w.first_token(t + 1, 2.0)
    w.tokens(75.0, 0.2, 9)
    w.tokens(76.0, 1.0, 1)
    obs = w.observe(80.0, datetime(2024, 3, 5, tzinfo=UTC), queue_depth=0, kv_usage=0.5, replicas={"p": 1},
                    starting={}, cold_start_s=10.0)
    assert obs.request_rate == pytest.approx(3 / 60) and obs.isl.p99 == 100
    assert obs.itl_s.p90 == pytest.approx(0.2) and obs.itl_s.p99 == pytest.approx(1.0)
    assert weighted_percentiles([]) is None


def test_day_trace_is_deterministic_and_shifts_the_mix(bench, services, day0):
    day = bench["day_trace"]
    a, b = day0, day.build_day(services, 0)
    assert a == b and a[:1000] != day.build_day(services, 1)[:1000]
    assert a == sorted(a)

    def code_share(hour: int) -> float:
        rows = [r for r in a if hour * 3600 <= r[0] < (hour + 1) * 3600]
        return sum(1 for r in rows if r[3] == "code") / len(rows)

    assert code_share(10) > 0.6 and code_share(20) < 0.2
    by_hour = [sum(1 for r in a if h * 3600 <= r[0] < (h + 1) * 3600) for h in range(24)]
    assert by_hour[3] < by_hour[10] / 5 and by_hour[3] < by_hour[20] / 5  # a quiet night
    assert max(r[1] + r[2] for r in a) <= 8192  # SmolLM2's context holds every scaled request


def test_the_shipped_day_trace_is_what_the_builder_writes(bench, day0, tmp_path):
    out = tmp_path / "day.csv.gz"
    bench["day_trace"].write_day(day0, out)
    assert gzip.decompress(out.read_bytes()) == gzip.decompress((BENCH / "data" / "day_trace.csv.gz").read_bytes())


def test_the_plot_is_a_png_and_the_windows_a_csv(bench, tmp_path):
    pytest.importorskip("matplotlib")
    result = _run(bench, [(0.0, 100, 1), (20.0, 50, 3)])
    windows = tmp_path / "windows.csv"
    bench["fleet_report"].write_windows([result], str(windows), 300.0)
    lines = windows.read_text().splitlines()
    assert lines[:2] == ["policy,window_start_s,num_requests,ttft_p90_s,itl_p90_s", "t,0,2,1.100,0.1000"]
    assert len(lines) == 1 + 288
    out = tmp_path / "day.png"
    bench["fleet_report"].plot([result, result], str(out), _config(), 300.0)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
