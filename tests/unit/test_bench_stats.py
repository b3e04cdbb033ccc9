"""kvtide bench statistics on hand-made records: percentiles, throughput, goodput, the
TTFT-against-ISL slope, and the engine profile drawn from them."""

from __future__ import annotations

import dataclasses

import pytest

from kvtide.cluster.bench.profile import EngineShape, engine_profile, parse_engine_shape
from kvtide.cluster.bench.records import RequestRecord
from kvtide.cluster.bench.stats import SLO, dist, parse_slo, summarize, summary_from_dict, ttft_fit


def rec(start_s=0.0, isl=100, osl=5, ttft_s=0.1, itl=0.02, e2e_s=None, error=None, warmup=False, point="c=1",
        target="t") -> RequestRecord:  # fmt: skip
    gaps = (itl,) * (osl - 1) if ttft_s is not None else ()
    e2e = e2e_s if e2e_s is not None else (ttft_s or 0) + sum(gaps)
    return RequestRecord(target=target, point=point, session_id=0, turn=0, pattern="p", warmup=warmup,
                         start_s=start_s, isl=isl, isl_target=isl, osl_target=osl, osl=osl if not error else 0,
                         ttft_s=ttft_s, itl_s=gaps, e2e_s=e2e, error_code=error,
                         error_message="boom" if error else None)  # fmt: skip


def test_percentiles_interpolate_linearly():
    d = dist([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], scale=1000)
    assert (d.p50, d.p90, d.p99, d.mean, d.count) == pytest.approx((5500, 9100, 9910, 5500, 10))
    assert dist([]) is None


def test_ttft_slope_recovers_a_hand_made_line():
    """TTFT = 20 ms + 0.5 ms per input token: 500 ms per 1k tokens, exact fit."""
    records = [rec(isl=n, ttft_s=(20 + 0.5 * n) / 1000) for n in (100, 400, 1000, 2500)]
    fit = ttft_fit(records)
    assert fit.ms_per_1k_tokens == pytest.approx(500) and fit.intercept_ms == pytest.approx(20)
    assert fit.r2 == pytest.approx(1.0) and fit.num_points == 4


def test_ttft_slope_needs_two_lengths_and_skips_failures():
    assert ttft_fit([rec(isl=100), rec(isl=100)]) is None
    noisy = [rec(isl=100, ttft_s=0.1), rec(isl=1100, ttft_s=0.6), rec(isl=5000, ttft_s=None, error="500")]
    assert ttft_fit(noisy).ms_per_1k_tokens == pytest.approx(500)


def test_summary_counts_throughput_over_the_window_and_skips_warmup():
    records = [
        rec(start_s=0.0, osl=5, ttft_s=0.1, itl=0.1, warmup=True),  # ignored entirely
        rec(start_s=1.0, osl=11, ttft_s=0.2, itl=0.1),  # ends at 2.2
        rec(start_s=1.5, osl=6, ttft_s=0.4, itl=0.2),  # ends at 2.9
        rec(start_s=2.0, osl=0, ttft_s=None, e2e_s=1.0, error="429"),  # ends at 3.0
    ]
    s = summarize(records)
    assert (s.num_requests, s.num_ok, s.errors) == (3, 2, {"429": 1})
    assert s.duration_s == pytest.approx(2.0)
    assert s.output_tokens_per_s == pytest.approx(17 / 2.0) and s.requests_per_s == pytest.approx(1.0)
    assert s.ttft_ms.p50 == pytest.approx(300)
    assert s.itl_ms.count == 10 + 5 and s.itl_ms.p50 == pytest.approx(100)
    assert s.tpot_ms.mean == pytest.approx(150)
    assert s.e2e_ms.count == 2 and s.goodput is None


def test_goodput_is_per_request_and_failures_are_never_good():
    records = [
        rec(start_s=0, ttft_s=0.1, itl=0.01),  # good
        rec(start_s=0, ttft_s=0.5, itl=0.01),  # TTFT too slow
        rec(start_s=0, ttft_s=0.1, itl=0.08),  # TPOT too slow
        rec(start_s=0, ttft_s=None, e2e_s=2.0, error="503"),
    ]
    s = summarize(records, SLO(ttft_ms=200, tpot_ms=50))
    assert s.goodput.num_good == 1 and s.goodput.fraction == pytest.approx(0.25)
    assert s.goodput.requests_per_s == pytest.approx(1 / 2.0)
    assert s.goodput.slo == "ttft_ms <= 200, tpot_ms <= 50"
    assert summarize(records, SLO(e2e_ms=1000)).goodput.num_good == 3


def test_parse_slo_and_its_errors():
    assert parse_slo("ttft_ms=2000, tpot_ms=80") == SLO(ttft_ms=2000, tpot_ms=80)
    assert parse_slo(None).empty
    with pytest.raises(ValueError, match="unknown SLO 'ttft_p90_ms' in --slo; known: e2e_ms, tpot_ms, ttft_ms"):
        parse_slo("ttft_p90_ms=1")
    with pytest.raises(ValueError, match="--slo ttft_ms must be a number of ms, got 'fast'"):
        parse_slo("ttft_ms=fast")


def test_prefix_cache_share_counts_only_requests_that_report_it():
    a = dataclasses.replace(rec(isl=100), cached_tokens=64)
    b = dataclasses.replace(rec(isl=300), cached_tokens=0)
    assert summarize([a, b, rec(isl=1000)]).prefix_cache_hit == pytest.approx(64 / 400)
    assert summarize([rec()]).prefix_cache_hit is None


def test_summary_survives_json_round_trip():
    s = summarize([rec(isl=100, start_s=0), rec(isl=900, ttft_s=0.5, start_s=1)], SLO(ttft_ms=300))
    assert summary_from_dict(dataclasses.asdict(s)) == s


def test_all_warmup_is_an_error():
    with pytest.raises(ValueError, match="no measured records"):
        summarize([rec(warmup=True)])


def test_engine_profile_reads_decode_steps_and_prefill_from_a_concurrency_sweep():
    points = []
    for c, step in ((16, 0.06), (1, 0.02), (4, 0.03)):
        rs = [rec(isl=n, ttft_s=(10 + (0.3 if c == 1 else 0.9) * n) / 1000, itl=step, point=f"concurrency={c}")
              for n in (100, 500, 900)]  # fmt: skip
        points.append(summarize(rs))
    p = engine_profile(points, "m", EngineShape("H100 SXM 80GB", 2, 1, "bfloat16"))
    assert [b for b, _ in p.decode_step_s] == [1, 4, 16]
    assert [s for _, s in p.decode_step_s] == pytest.approx([0.02, 0.03, 0.06])
    assert p.prefill_s_per_token == pytest.approx(0.0003)  # the slope at concurrency 1, the lightest
    assert (p.model, p.device, p.tp, p.pp, p.dtype) == ("m", "H100 SXM 80GB", 2, 1, "bfloat16")
    assert type(p).from_json(p.to_json()) == p  # what `kvtide size --profile` reads
    with pytest.raises(ValueError, match="needs closed-loop points"):
        engine_profile([summarize([rec(point="rate=2")])], "m", EngineShape())
    flat = [summarize([rec(isl=100, point="concurrency=1"), rec(isl=200, point="concurrency=1")])]
    with pytest.raises(ValueError, match=r"gives a slope of -?0.0 ms per 1k tokens; an engine profile needs"):
        engine_profile(flat, "m", EngineShape())


def test_profile_engine_option_parses_and_names_bad_keys():
    assert parse_engine_shape("device=L4,tp=2") == EngineShape("L4", 2, 1, "float32")
    with pytest.raises(ValueError, match="unknown key 'gpu' in --profile-engine"):
        parse_engine_shape("gpu=L4")
    with pytest.raises(ValueError, match="--profile-engine tp must be an integer >= 1, got '0'"):
        parse_engine_shape("tp=0")
