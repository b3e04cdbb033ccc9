"""The engine cost profile a bench run measures, for ``kvtide size --profile`` and the fleet
simulator: ``engine_profile.json`` in the format of ``workers.roofline.EngineProfileMeasurement``
(model, device, tp, pp, dtype, prefill_s_per_token, decode_step_s by batch size).

Method: in a closed loop of c users each request streams while c - 1 others do, so the
median inter-token gap at concurrency c is the engine's decode step time at a batch of about
c (a few of the c may be in prefill at any moment, which the median mostly skips). Prefill
cost per input token is the TTFT-against-ISL slope at the lightest load point, where queueing
is least. The server's device, layout and dtype are not visible over its API, so the caller
says them (``--profile-engine``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvtide.cluster.bench.stats import PointSummary
from kvtide.workers import EngineProfileMeasurement


@dataclass(frozen=True)
class EngineShape:
    """What the measured server ran on."""

    device: str = "cpu"
    tp: int = 1
    pp: int = 1
    dtype: str = "float32"


def parse_engine_shape(text: str) -> EngineShape:
    """``"device=H100 SXM 80GB,tp=2,pp=1,dtype=bfloat16"`` (any subset; the rest default)."""
    values: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        if key not in ("device", "tp", "pp", "dtype"):
            raise ValueError(f"unknown key {key!r} in --profile-engine; known: device, tp, pp, dtype")
        if key in ("tp", "pp"):
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--profile-engine {key} must be an integer >= 1, got {value!r}")
            values[key] = int(value)
        else:
            values[key] = value
    return EngineShape(**values)


def _concurrency(s: PointSummary) -> int:
    return int(float(s.point.split("=", 1)[1]))


def engine_profile(summaries: Sequence[PointSummary], model: str, shape: EngineShape) -> EngineProfileMeasurement:
    """From the first target's closed-loop points. Raises ``ValueError`` saying what is missing."""
    if not summaries:
        raise ValueError("no load points to profile")
    target = summaries[0].target
    closed = sorted((s for s in summaries if s.target == target and s.point.startswith("concurrency=")),
                    key=_concurrency)  # fmt: skip
    if not closed:
        raise ValueError("an engine profile needs closed-loop points (--concurrency 1,4,16): its decode step "
                         "times are the median ITL at each concurrency")  # fmt: skip
    steps = tuple((_concurrency(s), s.itl_ms.p50 / 1000) for s in closed if s.itl_ms and s.itl_ms.p50 > 0)
    if not steps:
        raise ValueError("no load point measured an inter-token gap (every OSL was 1 token?)")
    lightest = closed[0]
    fit = lightest.ttft_fit
    if fit is None or fit.ms_per_1k_tokens <= 0:
        slope = "no fit" if fit is None else f"a slope of {fit.ms_per_1k_tokens:.1f} ms per 1k tokens"
        raise ValueError(f"TTFT against ISL at {lightest.point} gives {slope}; an engine profile needs a positive "
                         "prefill cost: use prompts of several lengths (--mix all) and enough requests")  # fmt: skip
    return EngineProfileMeasurement(model, shape.device, shape.tp, shape.pp, shape.dtype,
                                    fit.ms_per_1k_tokens / 1e6, steps)  # fmt: skip


def write_profile(run_dir: Path, summaries: Sequence[PointSummary], model: str, shape: EngineShape) -> Path:
    path = Path(run_dir) / "engine_profile.json"
    path.write_text(engine_profile(summaries, model, shape).to_json())
    return path
