"""``kvtide bench`` against a real ``kvtide serve``: one small sweep over both its gRPC API and
its OpenAI HTTP API in one run, then the report with all five plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kvtide.cluster.bench.cli import main
from kvtide.cluster.bench.plots import PLOTS
from kvtide.cluster.bench.records import read_records
from tests.integration.serve_process import ServeProcess, clean_env

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def server():
    kvtide = Path(sys.executable).with_name("kvtide")
    cmd = [str(kvtide), "serve", "--grpc-port", "0", "--http-port", "0", "--kv-cache-gib", "0.05",
           "--max-model-len", "512", "--drain-timeout-s", "5"]  # fmt: skip
    sp = ServeProcess.start(cmd, clean_env(), START_TIMEOUT_S)
    try:
        yield sp
        assert sp.interrupt() == 0, sp.tail()
    finally:
        sp.kill()


def test_bench_measures_grpc_and_http_side_by_side_and_reports(server, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main([
        "--target", f"kvtide-grpc,grpc,127.0.0.1:{server.grpc_port}",
        "--target", f"kvtide-http,openai,{server.http_base}",
        "--concurrency", "1,2", "--num-requests", "3", "--warmup", "1",
        "--short-isl", "24", "--long-isl", "160", "--short-osl", "4", "--long-osl", "10",
        "--slo", "ttft_ms=60000", "--out", str(out), "--no-progress", "--request-timeout-s", "120",
    ])  # fmt: skip
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    records = list(read_records(out / "records.jsonl"))
    by_series = {(r.target, r.point) for r in records}
    assert by_series == {(t, p) for t in ("kvtide-grpc", "kvtide-http") for p in ("concurrency=1", "concurrency=2")}
    assert len(records) == 4 * 4
    for r in records:
        assert r.ok, (r.error_code, r.error_message)
        assert r.osl == r.osl_target  # ignore_eos + min_tokens hold every request to its OSL
        assert r.isl == r.isl_target  # the server's token count is the bench tokenizer's
        assert 0 < r.ttft_s < r.e2e_s and all(g >= 0 for g in r.itl_s)
        if r.target == "kvtide-grpc":
            assert len(r.itl_s) == r.osl - 1  # gRPC says how many tokens each message carried
        else:
            assert r.osl - 3 <= len(r.itl_s) <= r.osl - 1  # HTTP: one token per event with text
    # the same seeded prompts went to both APIs
    prompts = {t: sorted((r.point, r.session_id, r.isl) for r in records if r.target == t)
               for t in ("kvtide-grpc", "kvtide-http")}  # fmt: skip
    assert prompts["kvtide-grpc"] == prompts["kvtide-http"]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 4 and all(s["num_ok"] == 3 and s["output_tokens_per_s"] > 0 for s in summary)
    # every load point and target sent fresh text: none was served from an earlier one's cache
    assert all(s["prefix_cache_hit"] is not None and s["prefix_cache_hit"] < 0.5 for s in summary)
    report = (out / "report.md").read_text()
    for name, title in PLOTS.items():
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"![{title}](plots/{name}.png)" in report
    assert "kvtide-grpc" in report and "kvtide-http" in report
