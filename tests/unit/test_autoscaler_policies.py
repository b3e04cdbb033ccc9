"""The autoscaling policies on hand-made observations: scheduled, reactive, predictive, scale to zero,
and their combination. The helpers here (obs, config) serve the other autoscaler tests too."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kvtide.cluster.autoscaler.config import parse_config
from kvtide.cluster.autoscaler.observation import Observation, Percentiles
from kvtide.cluster.autoscaler.registry import make_policy

T0 = datetime(2024, 3, 5, 12, 0, tzinfo=UTC)
"""A Tuesday, noon UTC."""


def pct(p90: float) -> Percentiles:
    return Percentiles(mean=p90 / 2, p50=p90 / 2, p90=p90, p99=p90)


def obs(when: datetime = T0, *, rate: float = 1.0, queue: int = 0, kv: float = 0.3, ttft: float | None = 0.5,
        itl: float | None = 0.05, replicas: dict[str, int] | None = None, starting: dict[str, int] | None = None,
        isl: float = 100.0, osl: float = 10.0, cold_start_s: float = 120.0) -> Observation:
    return Observation(
        time=when, window_s=60.0, request_rate=rate, queue_depth=queue, kv_usage=kv,
        ttft_s=None if ttft is None else pct(ttft), itl_s=None if itl is None else pct(itl),
        isl=Percentiles(isl, isl, isl, isl), osl=Percentiles(osl, osl, osl, osl),
        replicas=replicas if replicas is not None else {"small": 4}, starting=starting or {},
        cold_start_s=cold_start_s,
    )


PROFILES = {
    "small": {"max_model_len": 2048, "max_num_seqs": 8, "max_num_batched_tokens": 264,
              "capacity": {"prefill_tokens_per_s": 1000.0, "decode_tokens_per_s": 100.0}},
    "long": {"max_model_len": 8192, "max_num_seqs": 4, "max_num_batched_tokens": 1024,
             "capacity": {"prefill_tokens_per_s": 800.0, "decode_tokens_per_s": 50.0}},
}


def config(**overrides: Any):
    data: dict[str, Any] = {"policy": "reactive", "slo": {"ttft_p90_s": 2.0, "itl_p90_s": 0.1},
                            "profiles": PROFILES, "reactive": {"profile": "small", "max_replicas": 20}}
    data.update(overrides)
    return parse_config(data)


def decide_all(policy, observations, state=None):
    """Run the policy over observations, each seeing the replicas the previous target asked for."""
    state = policy.initial_state() if state is None else state
    targets = []
    for o in observations:
        decision = policy.decide(o, state)
        targets.append(decision.target)
        state = decision.state
    return targets, state


# --- scheduled ---------------------------------------------------------------------------

LA = "America/Los_Angeles"
SEASONS = {
    "default": {"profile": "long", "min_replicas": 0, "max_replicas": 2},
    "seasons": [
        {"name": "work", "days": ["mon", "tue", "wed", "thu", "fri"], "start": "09:00", "end": "17:00",
         "profile": "small", "min_replicas": 2, "max_replicas": 10, "replicas": 6},
        {"name": "fri-night", "days": ["fri"], "start": "22:00", "end": "02:00",
         "profile": "small", "min_replicas": 1, "max_replicas": 3},
    ],
}


def _scheduled():
    c = config(policy="scheduled", timezone=LA, scheduled=SEASONS)
    return make_policy("scheduled", c)


def _season_at(policy, when: datetime) -> str:
    return policy.decide(obs(when), None).target.reason.split("'")[1]


@pytest.mark.parametrize(("when", "season"), [
    # Friday 2024-03-08 is PST (UTC-8): 16:30Z is 08:30, 17:30Z is 09:30.
    (datetime(2024, 3, 8, 16, 30, tzinfo=UTC), "default"),
    (datetime(2024, 3, 8, 17, 30, tzinfo=UTC), "work"),
    # DST starts Sunday 2024-03-10; Monday is PDT (UTC-7): 16:30Z is 09:30, 15:30Z is 08:30.
    (datetime(2024, 3, 11, 16, 30, tzinfo=UTC), "work"),
    (datetime(2024, 3, 11, 15, 30, tzinfo=UTC), "default"),
    (datetime(2024, 3, 11, 23, 59, tzinfo=UTC), "work"),  # 16:59 PDT
    (datetime(2024, 3, 12, 0, 0, tzinfo=UTC), "default"),  # 17:00 PDT: the end is exclusive
    # The Friday-night window runs into Saturday 02:00 local (PST: +8 h).
    (datetime(2024, 3, 9, 5, 59, tzinfo=UTC), "default"),  # Fri 21:59
    (datetime(2024, 3, 9, 6, 0, tzinfo=UTC), "fri-night"),  # Fri 22:00
    (datetime(2024, 3, 9, 9, 0, tzinfo=UTC), "fri-night"),  # Sat 01:00, the window opened on Friday
    (datetime(2024, 3, 9, 11, 0, tzinfo=UTC), "default"),  # Sat 03:00
    (datetime(2024, 3, 8, 9, 0, tzinfo=UTC), "default"),  # Fri 01:00: Thursday opens no such window
    (datetime(2024, 3, 9, 17, 30, tzinfo=UTC), "default"),  # Sat 09:30: not a work day
])
def test_scheduled_picks_the_window_across_dst_and_weekday_boundaries(when, season):
    assert _season_at(_scheduled(), when) == season


def test_scheduled_alone_runs_the_seasons_replicas_of_its_profile():
    policy = _scheduled()
    work = policy.decide(obs(datetime(2024, 3, 8, 17, 30, tzinfo=UTC)), None).target
    assert dict(work.replicas) == {"small": 6}
    night = policy.decide(obs(datetime(2024, 3, 9, 6, 0, tzinfo=UTC)), None).target
    assert dict(night.replicas) == {"small": 3}  # no replicas: the season's max
    assert "fri 22:00 America/Los_Angeles" in night.reason


def test_scheduled_first_matching_season_wins_and_extras_join_the_target():
    seasons = {"default": {"profile": "long", "max_replicas": 1},
               "seasons": [{"name": "a", "start": "10:00", "end": "12:00", "profile": "small", "max_replicas": 4,
                            "extra_replicas": {"long": 1}},
                           {"name": "b", "start": "08:00", "end": "20:00", "profile": "long", "max_replicas": 9}]}
    policy = make_policy("scheduled", config(policy="scheduled", scheduled=seasons))
    assert dict(policy.decide(obs(T0.replace(hour=11)), None).target.replicas) == {"small": 4, "long": 1}
    assert dict(policy.decide(obs(T0.replace(hour=13)), None).target.replicas) == {"long": 9}


# --- reactive ----------------------------------------------------------------------------

def _reactive(**settings):
    c = config(reactive={"profile": "small", "max_replicas": 20, "up_cooldown_s": 60.0, "down_cooldown_s": 300.0,
                         **settings})
    return make_policy("reactive", c)


def test_reactive_scales_up_on_an_slo_breach_by_its_step():
    policy = _reactive(step_up=0.25)
    d = policy.decide(obs(ttft=2.5, replicas={"small": 8}), policy.initial_state())
    assert dict(d.target.replicas) == {"small": 10}  # ceil(0.25 * 8)
    assert "TTFT p90 2.50 s > 1 x SLO 2 s" in d.target.reason
    assert d.state.last_direction == 1 and d.state.last_change == T0


@pytest.mark.parametrize("signal", [{"queue": 9}, {"kv": 0.95}, {"itl": 0.2}])
def test_reactive_scales_up_on_queue_kv_and_itl(signal):
    policy = _reactive()
    assert policy.decide(obs(replicas={"small": 4}, **signal), policy.initial_state()).target.total == 5


def test_reactive_does_not_flap_under_noise_within_its_hysteresis():
    policy = _reactive()
    noisy = []
    for i in range(200):
        hi = i % 2 == 0
        # Every signal moves between its down and up thresholds, never past either.
        noisy.append(obs(T0 + timedelta(seconds=30 * i), queue=7 if hi else 2, kv=0.85 if hi else 0.65,
                         ttft=1.9 if hi else 1.1, itl=0.09 if hi else 0.06, replicas={"small": 4}))
    targets, state = decide_all(policy, noisy)
    assert {t.total for t in targets} == {4}
    assert state.last_change is None


def test_reactive_honours_its_cooldowns():
    policy = _reactive(step_up=0.0)
    state = policy.initial_state()
    n = 4

    def step(seconds: float, **signals) -> int:
        nonlocal state, n
        d = policy.decide(obs(T0 + timedelta(seconds=seconds), replicas={"small": n}, **signals), state)
        state, n = d.state, d.target.total
        return n

    assert step(0, ttft=3.0) == 5  # breach: up
    assert step(30, ttft=3.0) == 5  # up cooldown (60 s)
    assert step(61, ttft=3.0) == 6
    assert step(120, ttft=0.1) == 6  # calm, but the down cooldown (300 s) runs from the last change
    assert step(360, ttft=0.1) == 6
    assert step(362, ttft=0.1) == 5
    assert step(400, ttft=0.1) == 5  # one step down per cooldown
    assert step(662, ttft=0.1) == 4


def test_reactive_waits_for_starting_replicas_before_adding_more():
    policy = _reactive()
    d = policy.decide(obs(ttft=9.0, replicas={"small": 5}, starting={"small": 1}), policy.initial_state())
    assert d.target.total == 5 and "still starting" in d.target.reason


def test_reactive_stays_within_its_bounds():
    policy = _reactive(min_replicas=3, max_replicas=4)
    assert policy.decide(obs(ttft=9.0, replicas={"small": 4}), policy.initial_state()).target.total == 4
    assert policy.decide(obs(ttft=0.1, replicas={"small": 3}), policy.initial_state()).target.total == 3


# --- predictive and scale to zero --------------------------------------------------------

def _rate(when: datetime) -> float:
    """1 req/s before noon UTC, 4 after."""
    return 1.0 if when.hour < 12 else 4.0


def _history(days: int, every_s: int = 300) -> list:
    start = datetime(2024, 3, 4, tzinfo=UTC)  # Monday
    return [obs(start + timedelta(seconds=s), rate=_rate(start + timedelta(seconds=s)))
            for s in range(0, days * 86400, every_s)]


def _predictive(util: float = 0.25, **extra):
    c = config(policy="predictive", predictive={"profile": "small", "max_replicas": 50, "target_utilization": util,
                                                "horizon_s": 600.0, **extra})
    return make_policy("predictive", c)


def test_predictive_forecasts_the_same_hour_of_earlier_days():
    policy = _predictive()
    _, state = decide_all(policy, _history(3))
    day4 = datetime(2024, 3, 7, tzinfo=UTC)
    # One req/s of 100 prompt + 10 output tokens is 0.1 + 0.1 = 0.2 busy replicas of "small";
    # at utilization 0.25: 0.8 -> 1 replica. Four req/s: 3.2 -> 4.
    at_11 = policy.decide(obs(day4.replace(hour=11), rate=1.0), state).target
    assert at_11.total == 1
    # At 11:50 the cold start (120 s) plus the horizon (600 s) reach past noon: size for 4 req/s.
    at_1150 = policy.decide(obs(day4.replace(hour=11, minute=50), rate=1.0), state).target
    assert at_1150.total == 4
    assert "forecast peak 4.00 req/s" in at_1150.reason


def test_predictive_scales_the_seasonal_forecast_by_the_recent_trend():
    policy = _predictive()
    _, state = decide_all(policy, _history(3))
    day4 = datetime(2024, 3, 7, 10, tzinfo=UTC)
    # The last 15 minutes ran at twice the usual rate: the forecast doubles, 2 req/s -> 1.6 -> 2.
    _, state = decide_all(policy, [obs(day4 + timedelta(minutes=m), rate=2.0) for m in (0, 5, 10)], state)
    assert policy.decide(obs(day4 + timedelta(minutes=12), rate=2.0), state).target.total == 2


def test_predictive_without_history_sizes_for_what_it_sees():
    policy = _predictive()
    assert policy.decide(obs(rate=4.0), policy.initial_state()).target.total == 4


def test_predictive_sizes_for_the_busiest_minute_or_the_mean():
    """Within each 5-minute bucket of the earlier days the rate alternates 1 and 3 req/s:
    the mean is 2 (1.6 -> 2 replicas at 0.25), the peak 3 (2.4 -> 3)."""
    start = datetime(2024, 3, 4, tzinfo=UTC)
    noisy = [obs(start + timedelta(seconds=s), rate=1.0 if (s // 150) % 2 else 3.0) for s in range(0, 3 * 86400, 150)]
    day4 = datetime(2024, 3, 7, 10, tzinfo=UTC)
    for size_for, expected in (("peak", 3), ("mean", 2)):
        policy = _predictive(size_for=size_for)
        _, state = decide_all(policy, noisy)
        assert policy.decide(obs(day4, rate=2.0), state).target.total == expected


def test_predictive_holds_the_highest_recent_count_for_its_stabilization_window():
    policy = _predictive(down_stabilization_s=600.0)
    busy = policy.decide(obs(T0, rate=4.0), policy.initial_state())
    assert busy.target.total == 4
    quiet = policy.decide(obs(T0 + timedelta(seconds=300), rate=1.0), busy.state).target
    assert quiet.total == 4 and "4 held for 600 s" in quiet.reason
    later = policy.decide(obs(T0 + timedelta(seconds=601), rate=1.0), busy.state).target
    assert later.total == 1


def _to_zero(**extra):
    c = config(policy="scale_to_zero", scale_to_zero={"profile": "small", "idle_s": 600.0, "margin_s": 60.0, **extra})
    return make_policy("scale_to_zero", c)


def test_scale_to_zero_after_idle_without_a_forecast():
    policy = _to_zero()
    _, state = decide_all(policy, [obs(T0, rate=1.0)])
    assert policy.decide(obs(T0 + timedelta(seconds=300), rate=0.0), state).target.total == 1  # idle 300 s < 600
    assert policy.decide(obs(T0 + timedelta(seconds=601), rate=0.0), state).target.total == 0
    assert policy.decide(obs(T0 + timedelta(seconds=601), rate=0.0, queue=1), state).target.total == 1


def test_scale_to_zero_refuses_when_traffic_returns_within_the_cold_start():
    """Three days of traffic from 07:00 to 19:00 UTC; at night the fleet may sleep, except
    when 07:00 is within cold start (120 s) + margin (60 s)."""
    policy = _to_zero()
    start = datetime(2024, 3, 4, tzinfo=UTC)
    days = [start + timedelta(seconds=s) for s in range(0, 3 * 86400, 300)]
    _, state = decide_all(policy, [obs(t, rate=1.0 if 7 <= t.hour < 19 else 0.0) for t in days])
    night = datetime(2024, 3, 7, 5, tzinfo=UTC)
    assert policy.decide(obs(night, rate=0.0), state).target.total == 0
    late = policy.decide(obs(datetime(2024, 3, 7, 6, 58, tzinfo=UTC), rate=0.0), state).target
    assert late.total == 1 and "within cold start 120 s + margin 60 s" in late.reason
    slow = policy.decide(obs(datetime(2024, 3, 7, 6, 50, tzinfo=UTC), rate=0.0, cold_start_s=900.0), state).target
    assert slow.total == 1  # a 15-minute cold start must begin before 06:45


# --- combined ----------------------------------------------------------------------------

def _combined(spec: str = "scheduled + reactive + predictive", seasons=None, **extra):
    seasons = seasons or {"default": {"profile": "small", "min_replicas": 2, "max_replicas": 6}}
    c = config(policy=spec, scheduled=seasons, predictive={"target_utilization": 0.25, "horizon_s": 600.0},
               reactive={"down_cooldown_s": 300.0, "up_cooldown_s": 60.0}, **extra)
    return make_policy(spec, c)


def test_combined_predictive_sets_the_base_within_the_seasons_bounds():
    policy = _combined()
    assert policy.decide(obs(rate=4.0, replicas={"small": 2}), policy.initial_state()).target.total == 4
    assert policy.decide(obs(rate=100.0, replicas={"small": 2}), policy.initial_state()).target.total == 6  # ceiling
    assert policy.decide(obs(rate=0.1, replicas={"small": 2}), policy.initial_state()).target.total == 2  # floor


def test_combined_predictive_counts_the_seasons_extras_as_serving_their_share():
    """4 req/s of 100 + 10 tokens: 400 prompt + 40 output tok/s. A small replica is 0.4 + 0.4 =
    0.8 busy with it, so at 0.25 the load needs 3.2 small replicas (4). A long one would be
    0.5 + 0.8 = 1.3 busy: it serves 0.8 / 1.3 = 0.615 of a small one's work."""
    profiles = {**PROFILES, "bare": {"max_model_len": 8192, "max_num_seqs": 4, "max_num_batched_tokens": 1024}}

    def decide(extras):
        seasons = {"default": {"profile": "small", "min_replicas": 1, "max_replicas": 10, "extra_replicas": extras}}
        policy = _combined("scheduled + predictive", seasons=seasons, profiles=profiles)
        return policy.decide(obs(rate=4.0, replicas={"small": 4, **extras}), policy.initial_state()).target

    assert dict(decide({}).replicas) == {"small": 4}
    one = decide({"long": 1})
    assert dict(one.replicas) == {"small": 3, "long": 1}  # ceil(3.2 - 0.615)
    assert "0.62 of the 3.20 needed served by 1 long" in one.reason
    assert dict(decide({"long": 2}).replicas) == {"small": 2, "long": 2}  # ceil(3.2 - 1.23)
    assert dict(decide({"long": 6}).replicas) == {"small": 1, "long": 6}  # they cover it all: the season's floor
    assert dict(decide({"bare": 1}).replicas) == {"small": 4, "bare": 1}  # no measured capacity: counts for nothing


def test_combined_reactive_corrects_upward_only():
    policy = _combined()
    breach = policy.decide(obs(rate=1.0, ttft=5.0, replicas={"small": 3}), policy.initial_state()).target
    assert breach.total == 4 and "reactive up" in breach.reason  # predictive says 1 (floor 2); reactive: 3 + 1
    calm = policy.decide(obs(rate=4.0, ttft=0.1, replicas={"small": 3}), policy.initial_state()).target
    assert calm.total == 4  # calm, but reactive never pulls below predictive


def test_combined_keeps_what_reactive_added_until_the_signals_are_calm():
    policy = _combined()
    d = policy.decide(obs(rate=1.0, ttft=5.0, replicas={"small": 3}), policy.initial_state())
    assert d.target.total == 4 and d.state.reactive.level == 4
    later = T0 + timedelta(seconds=400)  # past the down cooldown; predictive alone would say 2 (the floor)
    band = policy.decide(obs(later, rate=1.0, ttft=1.5, replicas={"small": 4}), d.state).target
    assert band.total == 4  # TTFT p90 1.5 s: between 0.5 x SLO and the SLO, reactive holds its level
    calm = policy.decide(obs(later, rate=1.0, ttft=0.2, replicas={"small": 4}), d.state)
    assert calm.target.total == 3 and calm.state.reactive.level == 3  # one down step per cooldown


def test_combined_decreases_wait_for_the_down_cooldown():
    policy = _combined()
    d = policy.decide(obs(rate=4.0, replicas={"small": 2}), policy.initial_state())
    assert d.target.total == 4
    early = policy.decide(obs(T0 + timedelta(seconds=120), rate=1.0, replicas={"small": 4}), d.state).target
    assert early.total == 4 and "down cooldown" in early.reason
    later = policy.decide(obs(T0 + timedelta(seconds=301), rate=1.0, replicas={"small": 4}), d.state).target
    assert later.total == 2


def test_combined_at_a_season_change_takes_the_old_profiles_fleet_as_current():
    seasons = {"default": {"profile": "small", "max_replicas": 10},
               "seasons": [{"name": "evening", "start": "18:00", "end": "23:00", "profile": "long",
                            "min_replicas": 1, "max_replicas": 10}]}
    policy = _combined("scheduled + reactive", seasons=seasons)
    d = policy.decide(obs(T0.replace(hour=18), ttft=5.0, replicas={"small": 4}), policy.initial_state()).target
    assert dict(d.replicas) == {"long": 5}
    # The old fleet's profile may also be the new season's extra: one of its replicas stays as such.
    seasons["seasons"][0]["extra_replicas"] = {"small": 1}
    policy = _combined("scheduled + reactive", seasons=seasons)
    d = policy.decide(obs(T0.replace(hour=18), ttft=5.0, replicas={"small": 4}), policy.initial_state()).target
    assert dict(d.replicas) == {"long": 4, "small": 1}  # current 4 - 1 extra = 3, + the step of 1


def test_combined_goes_to_zero_only_through_scale_to_zero():
    seasons = {"default": {"profile": "small", "min_replicas": 0, "max_replicas": 6}}
    idle = [obs(T0 + timedelta(seconds=s), rate=0.0, ttft=None, itl=None, replicas={"small": 1}) for s in (0, 700)]
    without, _ = decide_all(_combined("scheduled + predictive", seasons=seasons), idle)
    assert without[-1].total == 1
    with_zero, _ = decide_all(_combined("scheduled + predictive + scale_to_zero", seasons=seasons,
                                        scale_to_zero={"idle_s": 600.0}), idle)
    assert [t.total for t in with_zero] == [1, 0]


def test_registry_names_the_known_policies():
    with pytest.raises(ValueError, match="unknown autoscaling policy 'magic'.*known policies: predictive, reactive, "
                                         "scale_to_zero, scheduled, static"):
        make_policy("reactive + magic", config())
    with pytest.raises(ValueError, match="'static' does not combine"):
        make_policy("static + reactive", config(static={"profile": "small", "replicas": 1}))
