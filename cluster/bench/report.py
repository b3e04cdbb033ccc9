"""Summary tables (terminal and Markdown) and ``report.md``: ``kvtide bench report RUN_DIR``
redraws the plots from the run's records and writes one Markdown page with all of it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from kvtide.cluster.bench.plots import PLOTS, write_plots
from kvtide.cluster.bench.records import read_records
from kvtide.cluster.bench.run import CONFIG, RECORDS, SUMMARY
from kvtide.cluster.bench.stats import Dist, PointSummary, summary_from_dict

_CAPTIONS = {
    "isl_osl_hist": "Each cell counts the requests with that input length (x) and output length received (y): "
    "the workload's shape. Requests of one ISL/OSL pattern form one cluster.",
    "ttft_vs_isl": "One dot per request. The line is the least-squares fit; its slope (in the legend) is what "
    "each 1k input tokens adds to the time to first token at that load: the prefill cost plus any queueing "
    "that grows with the prompt.",
    "itl_vs_position": "The gap before each output token, over all requests that reached that position: the "
    "median line and the 10th-90th percentile band. A rising line means decode slows as the context grows; "
    "spikes are steps where other requests' prefills ran.",
    "e2e_by_pattern": "Time from sending a request to its last token, one box per workload pattern (and per "
    "load point when several ran).",
    "throughput_vs_latency": "One marker per load point of the sweep: total output tokens/s (x) against the "
    "median and p90 TTFT (left) and ITL (right). Down and to the right is better; the knee is where more load "
    "buys latency, not throughput.",
}


_OSL_CONTROL = {
    "both": "max_tokens, ignore_eos and min_tokens",
    "ignore_eos": "max_tokens and ignore_eos",
    "min_tokens": "max_tokens and min_tokens",
    "none": "max_tokens only (the server may stop early at EOS)",
}


def _ms(d: Dist | None, key: str) -> str:
    if d is None:
        return "-"
    v = getattr(d, key)
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def table_rows(summaries: Sequence[PointSummary]) -> tuple[list[str], list[list[str]]]:
    head = ["target", "load", "ok/sent", "req/s", "out tok/s", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms",
            "TPOT p50 ms", "E2E p50/p90 s", "TTFT ms/1k ISL", "prefix cached %", "goodput req/s (good %)",
            "client CPU µs/token", "client loop lag p99 ms"]  # fmt: skip
    rows = []
    for s in summaries:
        e2e = "-" if s.e2e_ms is None else f"{s.e2e_ms.p50 / 1000:.2f} / {s.e2e_ms.p90 / 1000:.2f}"
        good = "-" if s.goodput is None else f"{s.goodput.requests_per_s:.2f} ({s.goodput.fraction:.0%})"
        cpu = "-" if s.client_cpu_us_per_token is None else f"{s.client_cpu_us_per_token:.0f}"
        rows.append([
            s.target, s.point, f"{s.num_ok}/{s.num_requests}", f"{s.requests_per_s:.2f}",
            f"{s.output_tokens_per_s:.1f}",
            " / ".join(_ms(s.ttft_ms, k) for k in ("p50", "p90", "p99")),
            " / ".join(_ms(s.itl_ms, k) for k in ("p50", "p90", "p99")),
            _ms(s.tpot_ms, "p50"), e2e,
            "-" if s.ttft_fit is None else f"{s.ttft_fit.ms_per_1k_tokens:.0f}",
            "-" if s.prefix_cache_hit is None else f"{s.prefix_cache_hit:.0%}", good, cpu,
            _ms(s.client_loop_lag_ms, "p99"),
        ])  # fmt: skip
    return head, rows


def format_table(summaries: Sequence[PointSummary]) -> str:
    head, rows = table_rows(summaries)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in [head, *rows]]
    return "\n".join(lines)


def markdown_table(summaries: Sequence[PointSummary]) -> str:
    head, rows = table_rows(summaries)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _errors(summaries: Sequence[PointSummary]) -> list[str]:
    lines = []
    for s in summaries:
        if s.errors:
            codes = ", ".join(f"{code}: {n}" for code, n in sorted(s.errors.items()))
            lines.append(f"- {s.target} {s.point}: {codes}")
    return lines


def write_report(run_dir: Path) -> Path:
    """Redraw the plots and write ``RUN_DIR/report.md``; returns its path."""
    run_dir = Path(run_dir)
    for name in (CONFIG, RECORDS, SUMMARY):
        if not (run_dir / name).is_file():
            raise ValueError(f"{run_dir} is not a finished bench run: it has no {name}")
    config = json.loads((run_dir / CONFIG).read_text())
    summaries = [summary_from_dict(row) for row in json.loads((run_dir / SUMMARY).read_text())]
    records = list(read_records(run_dir / RECORDS))
    paths = write_plots(records, summaries, run_dir / "plots")
    num_warmup = sum(r.warmup for r in records)
    targets = [f"`{t['label'] or t['backend']}`: {t['backend']} at `{t['url']}`, endpoint {t['endpoint']}, "
               f"model `{t['model'] or '(served)'}`, OSL enforced by {_OSL_CONTROL[t['osl_control']]}"
               for t in config["targets"]]  # fmt: skip
    stop = config["stop"]
    amount = (f"{stop['num_requests']} requests" if stop["num_requests"] else "") + (
        f"{' or ' if stop['num_requests'] else ''}{stop['duration_s']:g} s" if stop["duration_s"] else "")
    lines = [
        "# kvtide bench report", "",
        f"Run started {config['started']}. Made by:", "", "```", config["command"], "```", "",
        f"- **Workload:** {config['workload']}.",
        "- **Targets:** " + "; ".join(targets) + ".",
        f"- **Load points:** {', '.join(config['points'])}; at each, {amount or 'the whole trace'} after "
        f"{stop['warmup']} warm-up requests (excluded from every number: {num_warmup} in all). Seed {config['seed']}.",
        f"- **SLO for goodput** (per request: a request is good if it met every bound): "
        f"{config['slo_text'] if 'slo_text' in config else _slo_text(config['slo'])}.",
        f"- **Context length** used to fit requests: {config['max_model_len'] or 'unknown'} tokens.",
        f"- **Bench client machine:** {config.get('machine', 'not recorded')}.",
        *(f"- {note}" for note in config.get("notes", ())),
        "", "## Summary", "",
        "Latencies over successful requests: TTFT = send to first token; ITL = every gap between tokens, "
        "pooled; TPOT = a request's mean gap after its first token; E2E = send to last token. Throughput over "
        "the window from the first request's start to the last one's end. Prefix cached: the share of input "
        "tokens the server says it served from its prefix cache (every load point sends fresh text, so this is "
        "sharing inside the workload). Client CPU: this bench process's "
        "CPU time per output token received; client loop lag: how late its event loop woke a 50 ms timer "
        "(both its own overhead: a lag near the latencies measured means the client set them).", "",
        markdown_table(summaries), "",
    ]  # fmt: skip
    errors = _errors(summaries)
    if errors:
        lines += ["Failed requests by code:", "", *errors, ""]
    lines += ["## Plots", ""]
    for name, title in PLOTS.items():
        lines += [f"### {title}", "", f"![{title}](plots/{paths[name].name})", "", _CAPTIONS[name], ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _slo_text(slo: dict) -> str:
    parts = [f"{k} <= {v:g}" for k, v in slo.items() if v]
    return ", ".join(parts) or "none given (no goodput)"
