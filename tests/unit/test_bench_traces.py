"""kvtide bench traces: the bench JSONL format, the three real traces in ../shared/traces/ and
the scaling that fits them onto a small machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtide.cluster.bench.corpus import TextCorpus
from kvtide.cluster.bench.traces import (
    Trace,
    TraceRequest,
    TraceScaling,
    TraceWorkload,
    describe_scaling,
    read_trace,
    scale_trace,
    write_bench_jsonl,
)

TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"
needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason=f"the real traces are not at {TRACES}")


def _words(n: int = 500) -> TextCorpus:
    """One token per unit: a whitespace 'tokenizer', enough for everything but exactness."""
    return TextCorpus.build([" ".join(f"w{i}" for i in range(n))], lambda units: [1] * len(units))


@needs_traces
def test_mooncake_trace_reads_whole_with_its_prefix_blocks():
    trace = read_trace(TRACES / "mooncake_conversation.jsonl")
    reqs = trace.requests
    assert len(reqs) == 12031 and trace.block_tokens == 512
    assert reqs[0].arrival_s == 0.0 and 3500 < reqs[-1].arrival_s < 3600  # ms -> s, about an hour
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:], strict=False))
    assert all((len(r.hash_ids) - 1) * 512 < r.isl <= len(r.hash_ids) * 512 for r in reqs)
    assert 11500 < sum(r.isl for r in reqs) / len(reqs) < 12500  # README: mean input 12,035
    assert {r.pattern for r in reqs} == {"mooncake"}


@needs_traces
@pytest.mark.parametrize(("name", "count", "label"), [("azure2023_code.csv", 8819, "azure-code"),
                                                      ("azure2023_conv.csv", 19366, "azure-conv")])  # fmt: skip
def test_azure_traces_read_with_times_from_their_first_request(name, count, label):
    trace = read_trace(TRACES / name)
    reqs = trace.requests
    assert len(reqs) == count and reqs[0].arrival_s == 0.0
    assert 3300 < reqs[-1].arrival_s < 3700
    assert all(r.isl >= 1 and r.osl >= 1 and not r.hash_ids for r in reqs)
    assert {r.pattern for r in reqs} == {label}


@needs_traces
def test_mooncake_scaled_to_this_machine_keeps_its_prefix_sharing():
    trace = read_trace(TRACES / "mooncake_conversation.jsonl")
    s = TraceScaling(start_s=600, duration_s=300, sample=0.5, time_scale=0.1, length_scale=1 / 16,
                     max_model_len=2048, seed=4)  # fmt: skip
    scaled = scale_trace(trace, s)
    reqs = scaled.trace.requests
    in_window = [r for r in trace.requests if 600 <= r.arrival_s < 900]
    assert 0.4 * len(in_window) < len(reqs) < 0.6 * len(in_window)
    assert scaled.trace.block_tokens == 32
    assert all(0 <= r.arrival_s < 30 for r in reqs)  # 300 s of trace at x0.1
    assert all(r.isl + r.osl <= 2048 and (len(r.hash_ids) - 1) * 32 < r.isl <= len(r.hash_ids) * 32 for r in reqs)
    assert scaled.num_clipped > 0  # Mooncake's longest prompts (126k tokens / 16) do not fit 2048
    two_blocks = [r.hash_ids[:2] for r in reqs if len(r.hash_ids) >= 2]
    assert len(set(two_blocks)) < len(two_blocks)  # some prompts still share their first two blocks
    text = describe_scaling(trace, scaled, s)
    assert "lengths x0.0625 (prefix block 32 tokens)" in text and f"{len(reqs)} requests" in text


@needs_traces
def test_azure_conv_an_hour_fits_in_minutes():
    trace = read_trace(TRACES / "azure2023_conv.csv")
    scaled = scale_trace(trace, TraceScaling(sample=0.02, time_scale=1 / 30, length_scale=0.25, max_model_len=8192))
    reqs = scaled.trace.requests
    assert 300 < len(reqs) < 480 and reqs[-1].arrival_s < 125
    assert max(r.isl + r.osl for r in reqs) <= 8192


def test_bench_jsonl_round_trips_and_scales(tmp_path):
    reqs = (TraceRequest(0.0, 100, 10, (1, 2), pattern="a"), TraceRequest(1.5, 0, 5, prompt="Hello there"),
            TraceRequest(3.0, 40, 8, pattern="b"))  # fmt: skip
    path = tmp_path / "t.jsonl"
    write_bench_jsonl(path, reqs)
    trace = read_trace(path, block_tokens=64)
    assert trace.requests == (reqs[0], TraceRequest(1.5, 0, 5, prompt="Hello there", pattern="trace"), reqs[2])
    assert trace.block_tokens == 64
    scaled = scale_trace(trace, TraceScaling(time_scale=2.0, length_scale=0.5)).trace
    assert [r.arrival_s for r in scaled.requests] == [0.0, 3.0, 6.0]
    assert [(r.isl, r.osl) for r in scaled.requests] == [(50, 5), (0, 2), (20, 4)]
    assert scaled.block_tokens == 32


def test_bench_jsonl_errors_name_the_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"arrival_s": 0, "osl": 4, "isl": 10}) + "\n" + json.dumps({"arrival_s": 1, "osl": 4}))
    with pytest.raises(ValueError, match=r"bad.jsonl:2: give exactly one of 'prompt' and 'isl'"):
        read_trace(path, "bench")
    path.write_text(json.dumps({"arrival_s": 0, "isl": 10}))
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field 'osl'"):
        read_trace(path, "bench")
    with pytest.raises(ValueError, match="unknown trace format 'csv'"):
        read_trace(path, "csv")


def test_window_and_sample_are_seeded_and_shift_time_to_zero():
    trace = Trace(tuple(TraceRequest(float(t), 10, 5) for t in range(100)), 16, "t")
    a = scale_trace(trace, TraceScaling(start_s=20, duration_s=50, sample=0.5, seed=1)).trace.requests
    b = scale_trace(trace, TraceScaling(start_s=20, duration_s=50, sample=0.5, seed=1)).trace.requests
    c = scale_trace(trace, TraceScaling(start_s=20, duration_s=50, sample=0.5, seed=2)).trace.requests
    assert a == b and a != c
    assert 15 < len(a) < 35 and all(0 <= r.arrival_s < 50 for r in a)


def test_scaling_refuses_bad_values():
    with pytest.raises(ValueError, match=r"trace sample must be in \(0, 1\], got 0"):
        TraceScaling(sample=0)
    with pytest.raises(ValueError, match="trace time_scale must be > 0, got -1"):
        TraceScaling(time_scale=-1)


def test_trace_workload_builds_prompts_from_blocks_prompts_and_fresh_text():
    corpus = _words()
    trace = Trace((TraceRequest(0.0, 20, 4, (7, 8)), TraceRequest(0.5, 12, 3, (7, 9)),
                   TraceRequest(1.0, 0, 2, prompt="say hi now"), TraceRequest(2.0, 6, 2)), 10, "t")  # fmt: skip
    scaled = scale_trace(trace, TraceScaling())
    w = TraceWorkload(scaled, corpus, lambda text: len(text.split()), seed=0, description="d")
    s = list(w.sessions())
    assert [x.arrival_s for x in s] == [0.0, 0.5, 1.0, 2.0]
    turns = [x.turns[0] for x in s]
    assert [t.num_tokens for t in turns] == [20, 12, 3, 6]
    assert [len(t.text.split()) for t in turns] == [20, 12, 3, 6]
    assert turns[0].text.split()[:10] == turns[1].text.split()[:10]  # block 7 shared
    assert turns[0].text.split()[10:12] != turns[1].text.split()[10:12]
    assert turns[2].text == "say hi now" and w.describe() == "d"
    salted = [x.turns[0] for x in w.sessions(salt=1)]  # another load point: other words, same shape
    assert [(t.num_tokens, t.osl) for t in salted] == [(t.num_tokens, t.osl) for t in turns]
    assert salted[0].text != turns[0].text and salted[2].text == turns[2].text
    assert salted[0].text.split()[:10] == salted[1].text.split()[:10]
