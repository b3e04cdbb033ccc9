"""A cluster other nodes can reach: ``kvtide serve --address`` on a three-node Ray cluster whose
nodes each have their own model cache, a PP=2 replica with its stages on different nodes, the
embedded Redis behind a generated password, the API on 0.0.0.0. The scenario runs in its own
process (``multinode_scenario.py``): it needs a Ray cluster of its own."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCENARIO = Path(__file__).with_name("multinode_scenario.py")


def test_a_pp2_replica_spans_nodes_each_resolving_the_model_itself(tmp_path):
    done = subprocess.run([sys.executable, str(SCENARIO), str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    log = result["log"]
    assert [status for status, _ in result["replies"]] == [200, 200], result["replies"]
    assert all(body["usage"]["completion_tokens"] == 4 for _, body in result["replies"])
    assert result["exit_code"] == 0, log[-3000:]
    assert "embedded Redis on redis://:***@127.0.0.1:" in log  # a joined cluster: a password
    assert "OpenAI HTTP API on http://0.0.0.0:" in log
    stage_nodes = dict(re.findall(r"shard \(stage (\d), tp_rank 0\) on (\w+):", log))
    assert set(stage_nodes) == {"0", "1"} and stage_nodes["0"] != stage_nodes["1"], log[-3000:]
    nodes_with_model = [c for c, models in result["converted"].items() if models and "frontend" not in c]
    assert len(nodes_with_model) >= 2, result["converted"]  # each shard's node converted its own copy
