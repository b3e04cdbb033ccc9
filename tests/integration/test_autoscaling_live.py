"""The autoscaler live on a local autoscaling Ray cluster (Ray's own autoscaler and its fake
multi-node provider, nodes on 127.0.0.1), a tiny model, and a load generator that counts every
request. The scenarios run in their own process (``autoscaling_scenario.py``): each needs a Ray
cluster of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCENARIO = Path(__file__).with_name("autoscaling_scenario.py")


def run_scenario(tmp_path: Path, name: str) -> dict:
    done = subprocess.run([sys.executable, str(SCENARIO), str(tmp_path), name], capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in result, (result["error"], result.get("samples"), done.stderr[-3000:])
    assert result["leftover_pids"] == [], "the scenario's Ray processes outlived it"
    return result


def test_a_burst_scales_to_two_replicas_on_a_new_node_and_drains_back_to_one(tmp_path):
    r = run_scenario(tmp_path, "reactive")
    assert r["failures"] == [] and r["ok"] > 0, r["failures"][:5]
    counts = [len(s["fleet"]) for s in r["samples"]]
    ready = [sum(1 for _, _, state in s["fleet"] if state == "ready") for s in r["samples"]]
    assert counts[0] == 1 and max(ready) == 2 and ready[-1] == 1 and counts[-1] == 1, counts
    assert max(s["nodes"] for s in r["samples"]) > r["nodes_at_start"]  # Ray's autoscaler added a node
    # Removed by draining: out of routing, its requests finished within the drain timeout, stopped.
    drains = [line for line in r["fleet_log"] if line.startswith("fleet: draining")]
    assert len(drains) == 1 and any(line.endswith("drained and stopped") for line in r["fleet_log"]), r["fleet_log"]
    assert not any("after the" in line for line in r["fleet_log"]), r["fleet_log"]  # nothing left to move
    assert r["served_while_two"] > 0
    assert r["errors"] == 0 and r["failed_starts"] == 0
    assert 'kvtide:autoscaler_decisions_total{action="up"} 1.0' in r["metrics"]
    assert 'kvtide:autoscaler_decisions_total{action="down"} 1.0' in r["metrics"]


def test_a_season_change_rolls_the_replicas_under_load_never_below_the_floor(tmp_path):
    r = run_scenario(tmp_path, "season")
    assert r["failures"] == [] and r["ok"] > 0, r["failures"][:5]
    fleets = [s["fleet"] for s in r["samples"]]
    assert {p for _, p, _ in fleets[0]} == {"day"} and {p for _, p, _ in fleets[-1]} == {"evening"}
    ready = [sum(1 for _, _, state in f if state == "ready") for f in fleets]
    assert min(ready) >= r["floor"], ready
    assert r["errors"] == 0 and r["failed_starts"] == 0
    assert 'kvtide:autoscaler_decisions_total{action="roll"} 1.0' in r["metrics"]
