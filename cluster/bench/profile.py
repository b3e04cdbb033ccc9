"""An engine cost profile measured by a bench run, for ``kvtide size`` and the fleet simulator.

``engine_profile.json`` (schema ``kvtide.engine_profile/1``)::

    {"schema": "kvtide.engine_profile/1", "model": "smollm2-135m", "target": "grpc",
     "prefill_s_per_token": 0.00071,      # TTFT slope at the lightest load point, s per input token
     "prefill_overhead_s": 0.012,         # its intercept: fixed cost of a request's first step
     "prefill_r2": 0.97, "prefill_load_point": "concurrency=1",
     "decode_step_s": {"1": 0.021, "8": 0.034},   # median ITL at each closed-loop concurrency
     "source": "kvtide bench, RUN_DIR"}

Method: in a closed loop of c users each request streams while c - 1 others do, so the
median inter-token gap at concurrency c is the engine's decode step time at a batch of about
c (a few of the c may be in prefill at any moment, which the median mostly skips). Prefill
cost is the TTFT-against-ISL slope at the lightest load point, where queueing is least.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from kvtide.cluster.bench.stats import PointSummary

SCHEMA = "kvtide.engine_profile/1"


def engine_profile(summaries: Sequence[PointSummary], model: str) -> dict:
    """Of the first target's points. Raises ``ValueError`` when nothing fits a profile."""
    if not summaries:
        raise ValueError("no load points to profile")
    target = summaries[0].target
    points = [s for s in summaries if s.target == target]
    closed = [s for s in points if s.point.startswith("concurrency=")]
    if not closed:
        raise ValueError("an engine profile needs closed-loop points (--concurrency 1,4,16): its decode step "
                         "times are the median ITL at each concurrency")  # fmt: skip
    steps = {str(int(float(s.point.split("=")[1]))): s.itl_ms.p50 / 1000 for s in closed if s.itl_ms}
    lightest = min(closed, key=lambda s: float(s.point.split("=")[1]))
    fit = lightest.ttft_fit
    return {
        "schema": SCHEMA,
        "model": model,
        "target": target,
        "prefill_s_per_token": None if fit is None else fit.ms_per_1k_tokens / 1e6,
        "prefill_overhead_s": None if fit is None else fit.intercept_ms / 1000,
        "prefill_r2": None if fit is None else fit.r2,
        "prefill_load_point": lightest.point,
        "decode_step_s": steps,
    }


def write_profile(run_dir: Path, summaries: Sequence[PointSummary], model: str) -> Path:
    profile = engine_profile(summaries, model) | {"source": f"kvtide bench, {run_dir}"}
    path = Path(run_dir) / "engine_profile.json"
    path.write_text(json.dumps(profile, indent=1))
    return path
