"""``kvtide bench``: measure a serving endpoint under load; ``kvtide bench report RUN_DIR``.

Wired into ``kvtide`` through ``add_parser(subparsers)``; also ``python -m kvtide.cluster.bench``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from kvtide.cluster.bench.backends import OSL_CONTROLS, TargetConfig
from kvtide.cluster.bench.load import LoadPoint, StopRule
from kvtide.cluster.bench.stats import parse_slo
from kvtide.cluster.bench.workload_args import add_workload_args, make_workload_factory

DEFAULT_URLS = {"grpc": "127.0.0.1:50051", "openai": "http://127.0.0.1:8000/v1"}
DEFAULT_NUM_REQUESTS = 50


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="load-test a kvtide or OpenAI-compatible server; plots and a report",
                              description=__doc__)  # fmt: skip
    p.set_defaults(func=run, threads=None, bench_command=None, command_line=None)
    t = p.add_argument_group("target")
    t.add_argument("--backend", choices=("grpc", "openai"), default="grpc", help="kvtide's gRPC API or OpenAI HTTP")
    t.add_argument("--url", help="grpc: HOST:PORT (127.0.0.1:50051); openai: base URL (http://127.0.0.1:8000/v1)")
    t.add_argument("--label", default="", help="the target's name in records and plots (default: the backend)")
    t.add_argument("--target", action="append", default=[], metavar="LABEL,BACKEND,URL[,MODEL]",
                   help="a target to measure, repeatable: every target runs the same workload in turn "
                        "(replaces --backend/--url/--label)")  # fmt: skip
    t.add_argument("--model", default="smollm2-135m", help="model name sent with each request")
    t.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="completions: the prompt as raw text; chat: messages through the chat template")  # fmt: skip
    t.add_argument("--api-key", help="bearer token (default: $KVTIDE_API_KEY)")
    t.add_argument("--osl-control", choices=OSL_CONTROLS, default="both",
                   help="besides max_tokens, send ignore_eos and/or min_tokens so every request gets its OSL "
                        "(kvtide, vLLM: both; llama.cpp: ignore_eos; strict OpenAI servers: none)")  # fmt: skip
    t.add_argument("--temperature", type=float, default=0.0)
    t.add_argument("--request-timeout-s", type=float, default=600.0)
    t.add_argument("--extra-body", default="{}", help="JSON object merged into every HTTP request body")
    lo = p.add_argument_group("load (one of --concurrency / --rate; a list is a sweep)")
    lo.add_argument("--concurrency", type=_floats, help="closed loop: users in flight, e.g. 1,8,32")
    lo.add_argument("--rate", type=_floats, help="open loop: Poisson arrivals, requests/s, e.g. 1,2,4")
    lo.add_argument("--num-requests", type=int, help=f"measured requests per load point (default "
                    f"{DEFAULT_NUM_REQUESTS}; a trace: all of it)")  # fmt: skip
    lo.add_argument("--duration-s", type=float, help="stop starting requests after this long per load point")
    lo.add_argument("--warmup", type=int, default=2, help="requests sent first at each load point and not counted")
    add_workload_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--slo", help="per-request SLO for goodput: ttft_ms=...,tpot_ms=...,e2e_ms=... (any subset)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--note", action="append", default=[],
                   help="a line for the report, repeatable (e.g. how the server was started)")  # fmt: skip
    o.add_argument("--out", help="run directory (default: bench_runs/<date-time>)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    o.add_argument("--profile", action="store_true",
                   help="also write engine_profile.json for `kvtide size --profile`: prefill cost per input "
                        "token, decode step time by batch size (needs a --concurrency sweep)")  # fmt: skip
    o.add_argument("--profile-engine", default="device=cpu,tp=1,pp=1,dtype=float32",
                   help="what the measured server runs on, written into the profile (its API does not say): "
                        "device=...,tp=...,pp=...,dtype=...")  # fmt: skip
    sub = p.add_subparsers(dest="bench_command", metavar="{report}")
    r = sub.add_parser("report", help="write RUN_DIR/report.md (and redraw its plots) from a finished run")
    r.add_argument("run_dir", type=Path)
    return p


def _targets(args) -> tuple[TargetConfig, ...]:
    api_key = args.api_key or os.environ.get("KVTIDE_API_KEY") or None
    try:
        extra = json.loads(args.extra_body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--extra-body is not JSON: {exc}") from exc
    if not isinstance(extra, dict):
        raise ValueError(f"--extra-body must be a JSON object, got {args.extra_body!r}")
    common = dict(endpoint=args.endpoint, api_key=api_key, osl_control=args.osl_control,
                  temperature=args.temperature, request_timeout_s=args.request_timeout_s,
                  extra_body=tuple(extra.items()))  # fmt: skip
    if not args.target:
        url = args.url or DEFAULT_URLS[args.backend]
        return (TargetConfig(args.backend, url, label=args.label, model=args.model, **common),)
    out = []
    for spec in args.target:
        parts = spec.split(",")
        if len(parts) not in (3, 4):
            raise ValueError(f"--target wants LABEL,BACKEND,URL[,MODEL], got {spec!r}")
        model = parts[3] if len(parts) == 4 else args.model
        out.append(TargetConfig(parts[1], parts[2], label=parts[0], model=model, **common))
    return tuple(out)


def _points(args) -> tuple[LoadPoint, ...]:
    if args.concurrency and args.rate:
        raise ValueError("give --concurrency or --rate, not both")
    if args.concurrency:
        return tuple(LoadPoint("concurrency", v) for v in args.concurrency)
    if args.rate:
        return tuple(LoadPoint("rate", v) for v in args.rate)
    return (LoadPoint("trace"),) if args.workload == "trace" else (LoadPoint("concurrency", 1),)


def run(args) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    try:
        if args.bench_command == "report":
            from kvtide.cluster.bench.report import write_report

            print(write_report(args.run_dir))
            return 0
        return _run_bench(args)
    except ValueError as exc:
        print(f"kvtide bench: error: {exc}", file=sys.stderr)
        return 2


def _run_bench(args) -> int:
    from kvtide.cluster.bench.profile import parse_engine_shape
    from kvtide.cluster.bench.report import format_table, write_report
    from kvtide.cluster.bench.run import RunConfig
    from kvtide.cluster.bench.run import run as run_bench

    num = args.num_requests
    if num is None and args.duration_s is None and args.workload != "trace":
        num = DEFAULT_NUM_REQUESTS
    out = Path(args.out) if args.out else Path("bench_runs") / time.strftime("%Y%m%d-%H%M%S")
    config = RunConfig(
        targets=_targets(args), points=_points(args),
        stop=StopRule(num_requests=num, duration_s=args.duration_s, warmup=args.warmup),
        out_dir=out, slo=parse_slo(args.slo), seed=args.seed, max_model_len=args.max_model_len,
        progress=not args.no_progress, command=args.command_line or _command_line(), notes=tuple(args.note),
    )  # fmt: skip
    shape = parse_engine_shape(args.profile_engine) if args.profile else None
    make_workload, count_prompt = make_workload_factory(args)
    summaries = run_bench(config, make_workload, count_prompt)
    print(format_table(summaries))
    print(f"report: {write_report(out)}")
    if shape is not None:
        from kvtide.cluster.bench.profile import write_profile

        try:
            print(f"engine profile: {write_profile(out, summaries, args.model, shape)}")
        except ValueError as exc:  # the run and its report stand; only the profile is missing
            print(f"kvtide bench: no engine profile: {exc}", file=sys.stderr)
            return 1
    return 0


def _command_line() -> str:
    if Path(sys.argv[0]).name == "kvtide":
        return shlex.join(["kvtide", *sys.argv[1:]])
    return shlex.join(["python", "-m", "kvtide.cluster.bench", *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvtide")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(["bench", *argv])
    args.command_line = shlex.join(["python", "-m", "kvtide.cluster.bench", *argv])
    return args.func(args)
