"""The autoscaler's control loop (cluster/autoscaler/loop.py) with a fake fleet, fake signals and
fake clocks: what it observes over its window, what it decides and applies, what it asks Ray
for, what it exports, and that a failing tick is counted and retried."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from kvtide.cluster.autoscaler.actions import Actions, ReplicaView
from kvtide.cluster.autoscaler.config import load_config, parse_config
from kvtide.cluster.autoscaler.histograms import Histogram, window_percentiles
from kvtide.cluster.autoscaler.loop import ControlLoop, LiveSignals, action_of
from kvtide.cluster.autoscaler.observation import Target
from tests.unit.test_autoscaler_policies import PROFILES, T0

LATENCY = (0.1, 0.5, 1.0, 2.0, float("inf"))
TOKENS = (16.0, 64.0, 256.0, float("inf"))


class FakeFleet:
    """Replicas that start when told to and become ready on ``settle``; draining ones leave on
    ``settle`` too. Every applied ``Actions`` is kept."""

    def __init__(self, profile: str = "small", n: int = 1) -> None:
        self.replicas = {f"r{i}": [profile, "ready", 0] for i in range(n)}
        self.applied: list[Actions] = []
        self.cold_start_s: float | None = None
        self.fail = False
        self._next = n

    def views(self) -> list[ReplicaView]:
        return [ReplicaView(rid, p, s, busy, 0.0) for rid, (p, s, busy) in self.replicas.items()]

    def apply(self, actions: Actions) -> None:
        if self.fail:
            raise RuntimeError("Ray is unreachable")
        self.applied.append(actions)
        for rid in actions.cancel:
            del self.replicas[rid]
        for rid in actions.undrain:
            self.replicas[rid][1] = "ready"
        for rid in actions.drain:
            self.replicas[rid][1] = "draining"
        for profile, n in actions.start.items():
            for _ in range(n):
                self.replicas[f"r{self._next}"] = [profile, "starting", 0]
                self._next += 1

    def settle(self) -> None:
        for rid, (p, s, _) in list(self.replicas.items()):
            if s == "starting":
                self.replicas[rid][1] = "ready"
            elif s == "draining":
                del self.replicas[rid]

    def ready(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p, s, _ in self.replicas.values():
            if s == "ready":
                out[p] = out.get(p, 0) + 1
        return out


def hist(bounds, samples=()) -> Histogram:
    cumulative = tuple(float(sum(1 for s in samples if s <= b)) for b in bounds)
    return Histogram(tuple(bounds), cumulative, float(sum(samples)))


class FakeSignals:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.arrivals = 0
        self.queue = 0
        self.kv = 0.1

    def __call__(self) -> LiveSignals:
        return LiveSignals(
            ttft_s=hist(LATENCY, self.ttft), itl_s=hist(LATENCY), prompt_tokens=hist(TOKENS, [50] * self.arrivals),
            output_tokens=hist(TOKENS), arrivals=hist(LATENCY, [0.0] * self.arrivals),
            queue_depth=self.queue, kv_usage=self.kv,
        )


class Clock:
    def __init__(self) -> None:
        self.s = 1000.0

    def __call__(self) -> float:
        return self.s

    def wall(self):
        return T0 + timedelta(seconds=self.s - 1000.0)


def reactive_config(**reactive):
    r = {"profile": "small", "min_replicas": 1, "max_replicas": 2, "queue_up": 2.0, "up_cooldown_s": 0,
         "down_cooldown_s": 30, **reactive}  # fmt: skip
    return parse_config({"policy": "reactive", "slo": {"ttft_p90_s": 2.0, "itl_p90_s": 0.1}, "profiles": PROFILES,
                         "control_interval_s": 5, "window_s": 20, "reactive": r})  # fmt: skip


def make_loop(config, fleet, signals, clock, **kwargs):
    return ControlLoop(config, fleet, signals, clock=clock, wall=clock.wall, **kwargs)


def test_window_percentiles_read_the_buckets_of_the_difference():
    base = hist(LATENCY, [0.05] * 10)
    now = hist(LATENCY, [0.05] * 10 + [0.3] * 8 + [1.5, 3.0])
    p = window_percentiles(base, now)
    assert (p.p50, p.p90, p.p99) == (0.5, 2.0, 2.0)  # 8 of 10 at 0.5; the 9th at 2.0; +inf reads as 2.0
    assert p.mean == pytest.approx((0.3 * 8 + 1.5 + 3.0) / 10)
    assert window_percentiles(now, now) is None
    with pytest.raises(ValueError, match="buckets differ"):
        window_percentiles(base, hist(TOKENS))


def test_a_burst_scales_up_through_the_fleet_and_ray_then_drains_back_when_calm():
    clock, fleet, signals, asked = Clock(), FakeFleet(), FakeSignals(), []
    registry = CollectorRegistry()
    loop = make_loop(reactive_config(), fleet, signals, clock, request_resources=asked.append, registry=registry)

    assert loop.tick().replicas == {"small": 1}  # calm, at the floor
    assert asked == [[{"CPU": 1.0}]]
    signals.queue, signals.arrivals = 9, 40
    clock.s += 5
    target = loop.tick()
    assert target.replicas == {"small": 2} and "queue 9.00/replica > 2" in target.reason
    assert fleet.applied[-1].start == {"small": 1}
    assert asked[-1] == [{"CPU": 1.0}, {"CPU": 1.0}]  # the whole target fleet's shards
    # The window's arrivals: 40 over the 5 s since the first reading.
    assert loop.observe(clock.s, fleet.views()).request_rate == pytest.approx(40 / 5)

    clock.s += 5  # still starting: the queue is as long, but capacity is on its way
    assert loop.tick().replicas == {"small": 2}
    assert fleet.applied[-1].empty
    fleet.settle()
    assert fleet.ready() == {"small": 2}

    signals.queue = 0
    for _ in range(4):  # calm, but within the 30 s down cooldown of the scale-up (at +5 s)
        clock.s += 5
        assert loop.tick().replicas == {"small": 2}
    clock.s += 5
    target = loop.tick()
    assert target.replicas == {"small": 1} and "calm" in target.reason
    assert fleet.applied[-1].drain == ("r0",) or fleet.applied[-1].drain == ("r1",)
    fleet.settle()
    assert fleet.ready() == {"small": 1}
    assert asked[-1] == [{"CPU": 1.0}]
    assert len(asked) == 3  # asked again only when the target's resources changed

    value = registry.get_sample_value
    assert value("kvtide:autoscaler_target_replicas", {"profile": "small"}) == 1
    assert value("kvtide:autoscaler_decisions_total", {"action": "up"}) == 1
    assert value("kvtide:autoscaler_decisions_total", {"action": "down"}) == 1
    assert value("kvtide:autoscaler_decisions_total", {"action": "hold"}) == loop.num_ticks - 2
    assert value("kvtide:autoscaler_replicas", {"profile": "small", "state": "ready"}) == 2  # as it last saw it


def test_the_window_forgets_what_is_older_than_window_s():
    clock, fleet, signals = Clock(), FakeFleet(), FakeSignals()
    loop = make_loop(reactive_config(), fleet, signals, clock)
    signals.ttft = [1.5] * 10
    loop.tick()
    clock.s += 5
    signals.ttft += [0.05] * 10
    assert loop.observe(clock.s, fleet.views()).ttft_s.p90 == 0.1
    for _ in range(5):
        clock.s += 5
        obs = loop.observe(clock.s, fleet.views())
    assert obs.ttft_s is None and obs.window_s == 20  # nothing new within the last 20 s


def test_a_failing_action_is_logged_counted_and_retried_next_tick(caplog):
    clock, fleet, signals = Clock(), FakeFleet(), FakeSignals()
    registry = CollectorRegistry()
    loop = make_loop(reactive_config(), fleet, signals, clock, registry=registry)
    signals.queue, fleet.fail = 9, True
    assert loop.tick() is None
    assert "tick 1 failed" in caplog.text and "Ray is unreachable" in caplog.text
    assert registry.get_sample_value("kvtide:autoscaler_errors_total") == 1
    fleet.fail = False
    clock.s += 5
    assert loop.tick().replicas == {"small": 2}
    assert fleet.applied[-1].start == {"small": 1}


SEASONS = {
    "default": {"profile": "small", "min_replicas": 2, "max_replicas": 2},
    "seasons": [{"name": "long-evening", "start": "12:01", "end": "23:00", "profile": "long",
                 "min_replicas": 2, "max_replicas": 2}],
}  # fmt: skip


def test_a_season_change_rolls_make_before_break_never_below_the_floor():
    """At 12:01 the season's profile changes: the new replicas start first; the old ones drain
    only as the new ones are ready, so the ready count never drops below the floor of 2."""
    clock, fleet, signals = Clock(), FakeFleet("small", 2), FakeSignals()
    config = parse_config({"policy": "scheduled", "slo": {"ttft_p90_s": 2.0, "itl_p90_s": 0.1},
                           "profiles": PROFILES, "scheduled": SEASONS})  # fmt: skip
    registry = CollectorRegistry()
    loop = make_loop(config, fleet, signals, clock, shard_bundle={"GPU": 1.0}, request_resources=lambda b: None,
                     registry=registry)  # fmt: skip
    assert loop.tick().replicas == {"small": 2}
    clock.s += 60
    target = loop.tick()
    assert target.replicas == {"long": 2} and "long-evening" in target.reason
    assert fleet.applied[-1].start == {"long": 2} and fleet.applied[-1].drain == ()
    assert action_of({"small": 2}, target) == "roll"
    floor = []
    for _ in range(3):
        floor.append(sum(fleet.ready().values()))
        clock.s += 30
        loop.tick()
        floor.append(sum(fleet.ready().values()))
        fleet.settle()
    assert fleet.ready() == {"long": 2}
    assert min(floor) >= 2
    assert loop.bundles(target) == [{"GPU": 1.0}] * 2
    # One decision rolled; the ticks while the fleet caught up with it held.
    decisions = {a: registry.get_sample_value("kvtide:autoscaler_decisions_total", {"action": a})
                 for a in ("up", "down", "roll", "hold")}  # fmt: skip
    assert decisions == {"up": 0, "down": 0, "roll": 1, "hold": loop.num_ticks - 1}


def test_action_of_names_what_a_decision_does():
    assert action_of({"a": 1}, Target({"a": 2}, "")) == "up"
    assert action_of({"a": 2}, Target({"a": 1}, "")) == "down"
    assert action_of({"a": 2}, Target({"a": 2, "b": 0}, "")) == "hold"
    assert action_of({"a": 1, "b": 1}, Target({"a": 2}, "")) == "roll"


def test_the_shipped_example_loads_through_the_config_parser():
    config = load_config(Path(__file__).resolve().parents[2] / "deploy" / "autoscale.yaml")
    assert config.policy_names == ("reactive",)
    assert config.reactive.profile in config.profiles
    assert config.reactive.min_replicas >= 1


def test_serve_starts_at_the_profile_the_policy_wants_and_refuses_a_bad_file(tmp_path, capsys):
    from kvtide.cluster.autoscale import serve_config_for
    from kvtide.cluster.cli import main
    from kvtide.cluster.serve_config import ServeConfig
    from kvtide.workers import EngineConfig

    example = Path(__file__).resolve().parents[2] / "deploy" / "autoscale.yaml"
    base = ServeConfig(engine=EngineConfig.from_kwargs(model="m", max_num_seqs=64), num_replicas=3)
    config, profile = serve_config_for(base, load_config(example))
    assert profile == "chat" and config.num_replicas == 1  # reactive's floor on an idle fleet
    assert config.engine.scheduler.max_num_seqs == 32 and config.engine.model.model == "m"
    scheduled = parse_config({"policy": "scheduled", "slo": {"ttft_p90_s": 2.0, "itl_p90_s": 0.1},
                              "profiles": PROFILES, "scheduled": SEASONS})  # fmt: skip
    config, profile = serve_config_for(base, scheduled, T0 + timedelta(hours=1))
    assert (profile, config.num_replicas, config.engine.scheduler.max_num_seqs) == ("long", 2, 4)

    bad = tmp_path / "bad.yaml"
    bad.write_text(example.read_text().replace("max_replicas: 4", "max_replicas: 0"))
    assert main(["serve", "--autoscale", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"--autoscale: {bad}: reactive.max_replicas: 0 is below min_replicas 1" in err, err


def test_ray_is_asked_off_the_event_loop_and_a_failure_is_only_logged(monkeypatch, caplog):
    caplog.set_level("INFO", logger="kvtide.cluster.autoscale")
    import ray.autoscaler.sdk

    from kvtide.cluster.autoscale import RayResources

    asked = []

    def request_resources(bundles):
        asked.append(bundles)
        if len(asked) == 2:
            raise ConnectionError("GCS unreachable")

    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", request_resources)
    ray_resources = RayResources()
    ray_resources([{"CPU": 1.0}])
    ray_resources([{"CPU": 1.0}] * 2)
    ray_resources._pool.shutdown(wait=True)
    assert asked == [[{"CPU": 1.0}], [{"CPU": 1.0}] * 2]
    assert "asked Ray for 1 shard bundle(s) of {'CPU': 1.0}" in caplog.text
    assert "asking Ray for 2 shard bundle(s) failed: GCS unreachable" in caplog.text
