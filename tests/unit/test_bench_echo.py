"""``kvtide bench`` end to end at small scale against the echo server on 127.0.0.1: the CLI,
the HTTP backend and its SSE, records, summary, plots, report and engine profile."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import tokenizers
from tokenizers import pre_tokenizers
from tokenizers.models import WordLevel

from kvtide.cluster.bench.cli import main
from kvtide.cluster.bench.echo_server import EchoConfig, EchoServer
from kvtide.cluster.bench.plots import PLOTS
from kvtide.cluster.bench.records import read_records
from kvtide.workers.roofline import EngineProfileMeasurement

STOP_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def echo_url():
    """An echo server (a token every 2 ms, 0.5 ms of 'prefill' per prompt word) on its own event
    loop in a thread."""
    loop = asyncio.new_event_loop()
    server = EchoServer(EchoConfig(interval_s=0.002, max_model_len=4096, prefill_s_per_word=0.0005))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(STOP_TIMEOUT_S)
    yield f"http://127.0.0.1:{port}/v1"
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(STOP_TIMEOUT_S)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(STOP_TIMEOUT_S)
    loop.close()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """Every word one token: enough for the bench's bookkeeping (exact counts are tested
    with a real BPE in test_bench_workloads.py)."""
    backend = tokenizers.Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("words")
    backend.save(str(path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return path


def _bench(url: str, tokenizer_dir: Path, out: Path, *extra: str) -> int:
    return main(["--backend", "openai", "--url", url, "--tokenizer", str(tokenizer_dir), "--out", str(out),
                 "--short-isl", "16", "--long-isl", "64", "--short-osl", "4", "--long-osl", "12",
                 "--no-progress", *extra])  # fmt: skip


def test_sweep_writes_complete_records_summary_plots_report_and_profile(echo_url, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = _bench(echo_url, tokenizer_dir, out, "--concurrency", "1,4", "--num-requests", "10", "--warmup", "2",
                "--long-isl", "400", "--slo", "ttft_ms=5000,tpot_ms=1000", "--profile", "--label", "echo",
                "--note", "Server: the echo server.")  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "echo    concurrency=1" in printed and "concurrency=4" in printed and "report.md" in printed
    records = list(read_records(out / "records.jsonl"))
    assert len(records) == 2 * 12 and sum(r.warmup for r in records) == 4
    for r in records:
        assert r.ok and r.target == "echo" and r.osl == r.osl_target  # the echo streams max_tokens
        assert len(r.itl_s) == r.osl - 1 and 0 < r.ttft_s <= r.e2e_s
        assert r.isl == r.isl_target and r.pattern in ("long-short", "long-long", "short-long", "short-short")
    summary = json.loads((out / "summary.json").read_text())
    assert [s["point"] for s in summary] == ["concurrency=1", "concurrency=4"]
    assert all(s["num_ok"] == 10 and s["goodput"]["num_good"] == 10 for s in summary)
    assert all(s["client_cpu_s"] > 0 and s["client_loop_lag_ms"]["count"] >= 1 for s in summary)
    report = (out / "report.md").read_text()
    assert "--concurrency 1,4" in report and "ttft_ms <= 5000" in report and "- Server: the echo server." in report
    for name, title in PLOTS.items():
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"![{title}](plots/{name}.png)" in report
    profile = EngineProfileMeasurement.from_json((out / "engine_profile.json").read_text())
    assert [b for b, _ in profile.decode_step_s] == [1, 4] and profile.device == "cpu"
    assert profile.prefill_s_per_token > 0  # TTFT grows with the prompt: 200 ms more for the long ones
    config = json.loads((out / "config.json").read_text())
    assert config["targets"][0]["url"] == echo_url and config["workload"].startswith("ISL/OSL patterns")


def test_report_subcommand_rewrites_the_report_and_refuses_an_unfinished_dir(
    echo_url, tokenizer_dir, tmp_path, capsys
):  # fmt: skip
    out = tmp_path / "run"
    assert _bench(echo_url, tokenizer_dir, out, "--num-requests", "3", "--warmup", "0") == 0
    (out / "report.md").unlink()
    (out / "plots" / "ttft_vs_isl.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "plots" / "ttft_vs_isl.png").is_file()
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a finished bench run: it has no config.json" in capsys.readouterr().err
    assert _bench(echo_url, tokenizer_dir, out, "--num-requests", "3") == 2  # never overwrites a run
    assert "already holds a run" in capsys.readouterr().err


def test_failures_are_recorded_with_their_code_and_do_not_stop_the_run(echo_url, tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    rc = _bench(echo_url, tokenizer_dir, out, "--concurrency", "2", "--num-requests", "4", "--warmup", "0",
                "--extra-body", '{"echo_fail_after": 2}')  # fmt: skip
    assert rc == 0
    records = list(read_records(out / "records.jsonl"))
    assert len(records) == 4
    assert all(r.error_code == "500" and r.error_message == "echo_fail_after asked for it" for r in records)
    assert all(r.osl == 2 and r.ttft_s is not None for r in records)  # what arrived before the error
    assert "500: 4" in (out / "report.md").read_text()
    out2 = tmp_path / "run2"
    assert _bench(echo_url, tokenizer_dir, out2, "--num-requests", "2", "--extra-body", '{"echo_status": 429}') == 0
    assert {(r.error_code, r.osl, r.ttft_s) for r in read_records(out2 / "records.jsonl")} == {("429", 0, None)}


def test_multi_turn_chat_at_a_poisson_rate_carries_the_conversation(echo_url, tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    rc = _bench(echo_url, tokenizer_dir, out, "--workload", "multi-turn", "--turns", "3", "--user-tokens", "10",
                "--osl", "5", "--jitter", "0", "--endpoint", "chat", "--rate", "50", "--num-requests", "9",
                "--warmup", "0")  # fmt: skip
    assert rc == 0
    records = sorted(read_records(out / "records.jsonl"), key=lambda r: (r.session_id, r.turn))
    assert all(r.ok and r.point == "rate=50" for r in records)
    first_chat = [r for r in records if r.session_id == 0]
    assert [r.pattern for r in first_chat] == ["turn 1", "turn 2", "turn 3"]
    # each turn resends the chat so far: 10 user words and 5 answer words more per turn (+ role words)
    assert [b.isl_target - a.isl_target for a, b in zip(first_chat, first_chat[1:], strict=False)] == [17, 17]


def test_bad_options_are_refused_with_the_reason(tokenizer_dir, tmp_path, capsys):
    assert main(["--concurrency", "2", "--rate", "1", "--out", str(tmp_path / "a")]) == 2
    assert "give --concurrency or --rate, not both" in capsys.readouterr().err
    assert main(["--target", "x,grpc", "--out", str(tmp_path / "b")]) == 2
    assert "--target wants LABEL,BACKEND,URL[,MODEL], got 'x,grpc'" in capsys.readouterr().err
    assert main(["--backend", "openai", "--url", "127.0.0.1:8000", "--out", str(tmp_path / "c")]) == 2
    assert "must start with http:// or https://" in capsys.readouterr().err
