"""The parsers of bench/aiperf_check.py and bench/peers_serving.py on hand-written exports:
which field of aiperf's JSON and of ``kvtide bench``'s summary each printed number comes from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))  # the scripts import their neighbours by name

import aiperf_check  # noqa: E402
import peers_serving  # noqa: E402


def _stat(mean, p50, p90, unit="ms", mean_key="avg"):
    return {"unit": unit, mean_key: mean, "p50": p50, "p90": p90, "p99": p90 + 1}


def _aiperf_export(d: Path, ttft=(100.0, 90.0, 150.0), unit="ms") -> Path:
    d.mkdir()
    (d / "profile_export_aiperf.json").write_text(json.dumps({
        "time_to_first_token": _stat(*ttft, unit=unit),
        "inter_token_latency": _stat(20.0, 19.0, 25.0),
        "inter_chunk_latency": _stat(21.0, 18.0, 30.0),
        "output_token_throughput": {"unit": "tokens/sec", "avg": 50.0},
        "output_sequence_length": {"unit": "tokens", "avg": 63.0},
        "input_sequence_length": {"unit": "tokens", "avg": 256.0},
        "usage_prompt_tokens": {"unit": "tokens", "avg": 286.0},
        "benchmark_duration": {"unit": "sec", "avg": 12.0},
    }))  # fmt: skip
    return d


def _summary(d: Path, rows: int = 1) -> Path:
    d.mkdir()
    row = {"ttft_ms": _stat(110.0, 99.0, 160.0, mean_key="mean"), "tpot_ms": _stat(22.0, 21.0, 26.0, mean_key="mean"),
           "itl_ms": _stat(23.0, 20.0, 31.0, mean_key="mean"), "output_tokens_per_s": 56.0, "mean_osl": 64.0,
           "mean_isl": 286.0, "duration_s": 11.0, "num_ok": 15, "num_requests": 16, "prefix_cache_hit": 0.25}  # fmt: skip
    (d / "summary.json").write_text(json.dumps([row] * rows))
    return d


def test_aiperf_and_bench_exports_map_to_the_same_measures(tmp_path):
    a = aiperf_check.parse_aiperf(_aiperf_export(tmp_path / "a"), client_cpu_s=7.0, wall_s=40.0)
    b = aiperf_check.parse_kvtide_bench(_summary(tmp_path / "b"))
    assert a.ttft_ms == {"mean": 100.0, "p50": 90.0, "p90": 150.0}
    assert a.tpot_ms == {"mean": 20.0, "p50": 19.0, "p90": 25.0}  # aiperf's ITL is per request
    assert a.gap_ms == {"mean": 21.0, "p50": 18.0, "p90": 30.0}  # its inter-chunk latency is the pooled gaps
    assert (a.output_tok_s, a.mean_osl, a.mean_isl, a.duration_s, a.client_cpu_s) == (50.0, 63.0, 286.0, 12.0, 7.0)
    assert b.tpot_ms == {"mean": 22.0, "p50": 21.0, "p90": 26.0}
    assert b.gap_ms == {"mean": 23.0, "p50": 20.0, "p90": 31.0}
    lines = aiperf_check.table([a, a], [b, b]).splitlines()
    row = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert "| +10.0% **>10%** |" not in row["TTFT mean ms"]  # exactly 10% is within
    assert "+12.0% **>10%**" in row["output tok/s"]
    assert "+10.0% |" in row["TTFT p50 ms"]
    assert "**>10%**" not in row["output tokens / request"]  # explanatory rows are never judged


def test_parsers_refuse_what_they_cannot_compare(tmp_path):
    with pytest.raises(ValueError, match="time_to_first_token"):
        aiperf_check.parse_aiperf(_aiperf_export(tmp_path / "a", unit="s"))
    with pytest.raises(ValueError, match="has 2 rows, expected 1"):
        aiperf_check.parse_kvtide_bench(_summary(tmp_path / "b", rows=2))


def test_peer_table_ratios_are_kvtide_over_peer(tmp_path):
    k = peers_serving.parse_summary(_summary(tmp_path / "k"), "kvtide", "mixed")
    v = peers_serving.Result("vllm", "mixed", 50.0, 80.0, 10.0, 40.0, 28.0, 16, 16, 64.0, None)
    assert (k.ttft_p50_ms, k.ttft_p90_ms, k.itl_p50_ms, k.itl_p90_ms, k.output_tok_s) == (99.0, 160.0, 20.0, 31.0, 56.0)
    text = peers_serving.table("mixed", [peers_serving.median_result([k, k]), v])
    assert "| kvtide | 30/32 | 56.0 |" in text  # counts add up over rounds
    assert "| kvtide / vllm | 2.00 | 1.98 | 2.00 | 2.00 | 0.78 |" in text
