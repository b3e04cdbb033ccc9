"""The autoscale YAML: the shipped example parses; every error names the path, the value and the limit."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from kvtide.cluster.autoscaler.config import load_config, parse_config
from kvtide.cluster.autoscaler.registry import make_policy
from tests.unit.test_autoscaler_policies import PROFILES

EXAMPLE = Path(__file__).resolve().parents[2] / "cluster" / "autoscaler" / "example_autoscale.yaml"

BASE = {
    "policy": "scheduled + reactive",
    "timezone": "Europe/Paris",
    "slo": {"ttft_p90_s": 2.0, "itl_p90_s": 0.1},
    "profiles": PROFILES,
    "scheduled": {
        "default": {"profile": "long", "min_replicas": 0, "max_replicas": 2},
        "seasons": [
            {"name": "day", "start": "08:00", "end": "18:00", "profile": "small", "min_replicas": 2, "max_replicas": 8},
            {"name": "evening", "start": "18:00", "end": "23:00", "profile": "small", "min_replicas": 1,
             "max_replicas": 4},
        ],
    },
}


def _with(path: str, value) -> dict:
    """BASE with the value at a dotted path (list indices as numbers) replaced or added."""
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[int(last) if last.isdigit() else last] = value
    return data


def test_the_example_parses_and_builds_its_policy():
    config = load_config(EXAMPLE)
    policy = make_policy(config.policy, config)
    assert config.policy_names == ("scheduled", "reactive", "predictive")
    assert policy.name == "scheduled + reactive + predictive"
    assert config.scheduled.timezone == config.forecast.timezone == config.timezone
    assert all(p.capacity is not None for p in config.profiles.values())


def test_a_valid_config_resolves_into_frozen_dataclasses():
    config = parse_config(BASE)
    assert config.scheduled.seasons[1].name == "evening"
    assert config.profiles["small"].name == "small"
    assert config.profiles["small"].capacity.decode_tokens_per_s == 100.0
    with pytest.raises(AttributeError):
        config.policy = "static"  # frozen
    with pytest.raises(TypeError):
        config.profiles["x"] = config.profiles["small"]  # read-only view


@pytest.mark.parametrize(("path", "value", "message"), [
    ("scheduled.seasons.1.max_replicas", 0, "scheduled.seasons[1].max_replicas: 0 is below min_replicas 1"),
    ("scheduled.seasons.0.maxreplicas", 3, ("scheduled.seasons[0].maxreplicas: unknown key; known keys here: name, "
                                            "profile, min_replicas, max_replicas, replicas, days, start, end")),
    ("scheduled.seasons.0.profile", "nope", "scheduled.seasons[0].profile: 'nope' is not in profiles (small, long)"),
    ("scheduled.seasons.0.extra_replicas", {"huge": 1},
     "scheduled.seasons[0].extra_replicas.huge: 'huge' is not in profiles"),
    ("scheduled.seasons.0.days", ["monday"], "scheduled.seasons[0].days: 'monday' is not one of mon, tue"),
    ("scheduled.seasons.0.end", "25:00", "scheduled.seasons[0].end: '25:00' is not a time of day between 00:00 and 24:00"),
    ("scheduled.seasons.0.end", "08:00", "scheduled.seasons[0].end: '08:00' equals start '08:00'"),
    ("scheduled.seasons.1.name", "day", "scheduled.seasons[1].name: 'day' is used twice"),
    ("timezone", "Mars/Olympus", "timezone: 'Mars/Olympus' is not an IANA timezone"),
    ("profiles.small.max_num_seqs", "many", "profiles.small.max_num_seqs: expected an integer, got 'many'"),
    ("profiles.small.max_num_batched_tokens", 4, "profiles.small.max_num_batched_tokens: 4 is below max_num_seqs 8"),
    ("profiles.small.kv_cache_dtype", "fp4", "profiles.small.kv_cache_dtype: 'fp4' is not one of auto, fp8, int8"),
    ("profiles.small.router_weights", {"decode_weight": -1.0},
     "profiles.small.router_weights.decode_weight must be a finite number >= 0, got -1.0"),
    ("profiles.small.capacity", {"prefill_tokens_per_s": 0, "decode_tokens_per_s": 1},
     "profiles.small.capacity.prefill_tokens_per_s: 0.0 must be a finite number > 0"),
    ("slo.ttft_p90_s", -1, "slo.ttft_p90_s: -1.0 must be a finite number > 0"),
    ("policy", "scheduled + magic", ("policy: unknown autoscaling policy 'magic' in 'scheduled + magic'; known "
                                     "policies: predictive, reactive, scale_to_zero, scheduled, static")),
    ("window_s", 10, "window_s: 10.0 is below control_interval_s 30.0"),
    ("reactive", {"queue_up": 1.0, "queue_down": 2.0}, "reactive.queue_down: 2.0 must be >= 0 and below queue_up 1.0"),
    ("predictive", {"target_utilization": 1.5}, "predictive.target_utilization: 1.5 must be in (0, 1]"),
    ("forecast", {"bucket_s": 7}, "forecast.bucket_s: 7 must be an int in [60, 3600] that divides 86400"),
    ("extra", 1, "extra: unknown key; known keys here: policy, slo, profiles, timezone"),
])
def test_errors_name_the_path_the_value_and_the_limit(path, value, message):
    with pytest.raises(ValueError) as info:
        parse_config(_with(path, value))
    assert message in str(info.value)


def test_missing_sections_and_keys_are_named():
    data = copy.deepcopy(BASE)
    del data["slo"]
    with pytest.raises(ValueError, match=r"^slo: missing \(required\)$"):
        parse_config(data)
    with pytest.raises(ValueError, match=r"^scheduled: missing; policy 'scheduled \+ reactive' needs this section$"):
        parse_config({k: v for k, v in BASE.items() if k != "scheduled"})
    with pytest.raises(ValueError, match=r"^reactive.profile: missing; without scheduled, policy 'reactive'"):
        parse_config({**BASE, "policy": "reactive"})
    with pytest.raises(ValueError, match=r"^scheduled.seasons\[0\].profile: missing \(required\)$"):
        parse_config(_with("scheduled.seasons.0", {"name": "x"}))


def test_predictive_needs_each_seasons_profile_capacity():
    data = _with("policy", "scheduled + predictive")
    data["profiles"] = {**PROFILES, "small": {k: v for k, v in PROFILES["small"].items() if k != "capacity"}}
    config = parse_config(data)
    with pytest.raises(ValueError, match="profiles.small.capacity: missing; the predictive policy sizes replicas by it"):
        make_policy(config.policy, config)


def test_load_config_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: reactive\nslo: [unclosed\n")
    with pytest.raises(ValueError, match=rf"^{bad}: not valid YAML"):
        load_config(bad)
    bad.write_text("policy: reactive\n")
    with pytest.raises(ValueError, match=rf"^{bad}: slo: missing \(required\)$"):
        load_config(bad)
