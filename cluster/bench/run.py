"""One ``kvtide bench`` run: every target at every load point, the same workload each time,
into a run directory.

RUN_DIR holds ``config.json`` (the command and the resolved settings), ``records.jsonl`` (one
``RequestRecord`` per request, warm-up included and flagged), ``summary.json`` (one
``PointSummary`` per target and load point), ``plots/*.png`` and ``report.md``; with
``--profile``, ``engine_profile.json`` too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvtide.cluster.bench.backends import TargetConfig, make_backend
from kvtide.cluster.bench.load import Budget, LoadPoint, PointContext, StopRule, run_point
from kvtide.cluster.bench.progress import Progress
from kvtide.cluster.bench.records import RequestRecord, write_records
from kvtide.cluster.bench.stats import SLO, PointSummary, dist, summarize
from kvtide.cluster.bench.workloads import Workload

RECORDS, SUMMARY, CONFIG = "records.jsonl", "summary.json", "config.json"


@dataclass(frozen=True)
class RunConfig:
    targets: tuple[TargetConfig, ...]
    points: tuple[LoadPoint, ...]
    stop: StopRule
    out_dir: Path
    slo: SLO = SLO()
    seed: int = 0
    max_model_len: int | None = None
    """The context to fit trace requests into; None: the smallest any target reports."""
    progress: bool = True
    command: str = ""
    """The command line, quoted, for the report."""
    notes: tuple[str, ...] = ()
    """Lines for the report (how the server was started, what else ran)."""

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("a bench run needs at least one target")
        if not self.points:
            raise ValueError("a bench run needs at least one load point")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"target labels must differ, got {names}: give each a --label")


WorkloadFactory = Callable[[int | None], Workload]
"""Builds the workload once the context length is known (trace clipping needs it)."""


def prepare_dir(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / RECORDS).exists():
        raise ValueError(f"{out_dir} already holds a run ({RECORDS}); choose another --out directory")


async def _max_model_len(backends) -> int | None:
    lengths = []
    for b in backends:
        try:
            lengths.append(await asyncio.wait_for(b.max_model_len(), timeout=30))
        except Exception as exc:  # noqa: BLE001 - only a hint: the run can go on without it
            print(f"note: {b.target.name} did not say its context length: {exc!r}", file=sys.stderr)
    known = [n for n in lengths if n]
    return min(known) if known else None


async def run_async(config: RunConfig, make_workload: WorkloadFactory,
                    count_prompt: Callable[[tuple[tuple[str, str], ...]], int]) -> list[PointSummary]:  # fmt: skip
    backends = [make_backend(t) for t in config.targets]
    summaries: list[PointSummary] = []
    try:
        max_len = config.max_model_len or await _max_model_len(backends)
        workload = make_workload(max_len)
        _write_config(config, workload.describe(), max_len)
        for backend in backends:
            for point in config.points:
                salt = len(summaries)  # fresh text for every target and load point (see workloads.py)
                summaries.append(await _run_one(config, backend, point, workload, count_prompt, salt))
    finally:
        for b in backends:
            await b.aclose()
    (config.out_dir / SUMMARY).write_text(json.dumps([dataclasses.asdict(s) for s in summaries], indent=1))
    return summaries


async def _run_one(config: RunConfig, backend, point: LoadPoint, workload: Workload, count_prompt,
                   salt: int) -> PointSummary:  # fmt: skip
    records: list[RequestRecord] = []
    label = f"{backend.target.name} {point.label}"
    budget_total = None if config.stop.num_requests is None else config.stop.num_requests + config.stop.warmup
    progress = Progress(label, budget_total, config.stop.duration_s, enabled=config.progress)

    def on_record(r: RequestRecord) -> None:
        records.append(r)
        progress.update(r.ok)

    cpu0, t0 = time.process_time(), time.perf_counter()
    ctx = PointContext(backend, point, Budget(config.stop, t0, time.perf_counter), t0, count_prompt, on_record)
    lags: list[float] = []
    monitor = asyncio.create_task(_loop_lag(lags))
    try:
        await run_point(workload.sessions(salt), ctx, config.seed)
    finally:
        monitor.cancel()
        progress.close()
        write_records(config.out_dir / RECORDS, records)
    cpu = time.process_time() - cpu0
    summary = summarize(records, config.slo)
    tokens = sum(r.osl for r in records)  # warm-up too: the CPU time covers them
    per_token = cpu / tokens * 1e6 if tokens else None
    return dataclasses.replace(summary, client_cpu_s=cpu, client_cpu_us_per_token=per_token,
                               client_loop_lag_ms=dist(lags, 1000))  # fmt: skip


async def _loop_lag(out: list[float], interval_s: float = 0.05) -> None:
    """How late the event loop wakes a sleeper: a busy client delays every token it reads by
    about this much, so a high lag means the client, not the server, set the latencies."""
    while True:
        t = time.perf_counter()
        await asyncio.sleep(interval_s)
        out.append(max(0.0, time.perf_counter() - t - interval_s))


def _write_config(config: RunConfig, workload: str, max_len: int | None) -> None:
    def plain(obj):
        if dataclasses.is_dataclass(obj):
            return {k: plain(v) for k, v in dataclasses.asdict(obj).items()}
        if isinstance(obj, Path):
            return str(obj)
        if isinstance(obj, tuple | list):
            return [plain(v) for v in obj]
        return obj

    targets = []
    for t in config.targets:
        row = plain(t)
        row["api_key"] = "***" if t.api_key else None  # never write a secret into the run dir
        targets.append(row)
    body = {"command": config.command, "workload": workload, "targets": targets,
            "points": [p.label for p in config.points], "stop": plain(config.stop), "slo": plain(config.slo),
            "seed": config.seed, "max_model_len": max_len,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": _machine(),
            "notes": list(config.notes)}  # fmt: skip
    (config.out_dir / CONFIG).write_text(json.dumps(body, indent=1))


def _machine() -> str:
    """The client machine, for the report: on a shared box its load moves every latency."""
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    line = f"{platform.node()}, {os.cpu_count()} CPUs, load average {load} (1, 5, 15 min) at the start"
    try:  # Linux pressure stall information: the share of time some runnable task waited for a CPU
        some = Path("/proc/pressure/cpu").read_text().split("\n")[0].split()
        line += f", CPU pressure {dict(kv.split('=') for kv in some[1:])['avg60']}% (PSI some, 60 s)"
    except (OSError, KeyError, ValueError, IndexError):
        pass
    return line


def run(config: RunConfig, make_workload: WorkloadFactory, count_prompt) -> list[PointSummary]:
    prepare_dir(config.out_dir)
    return asyncio.run(run_async(config, make_workload, count_prompt))
