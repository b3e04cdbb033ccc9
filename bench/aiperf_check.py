"""Cross-check ``kvtide bench`` against NVIDIA's aiperf (a tool nobody here wrote), same server,
same workload, interleaved runs.

One command:  .venv/bin/python bench/aiperf_check.py [--pairs 3] [--num-requests 16]
It creates bench/peers/aiperf (aiperf from PyPI, once), starts ``kvtide serve`` on 127.0.0.1
(bench/kvtide_server.py: 2 threads, fp32, prefix caching on), sends a few unmeasured requests,
then runs, in pairs, aiperf and ``kvtide bench`` one after the other on the same workload:
OpenAI chat endpoint, streaming, synthetic prompts of --isl tokens, exactly --osl output tokens
(max_tokens plus ignore_eos and min_tokens on both), --concurrency users in a closed loop,
--num-requests requests, no warm-up phase in either (the server is already warm), a new seed
each pair so no prompt is ever served from an earlier run's prefix cache. Both count tokens
with the model's own HF tokenizer directory.

It prints, per pair and as the median over pairs, TTFT mean/p50/p90, inter-token latency
(aiperf's per-request ITL = kvtide bench's TPOT; aiperf's inter-chunk latency = kvtide bench's
pooled ITL), output tokens/s, and the relative difference (kvtide bench - aiperf) / aiperf,
marking those over 10%; also each client's own CPU time, since on this 2-core machine the
client competes with the server. Raw outputs stay in bench/out/aiperf/<time>/.

kvtide's streamed completions chunks carry ``"object": "text_completion.chunk"``, which aiperf
0.13 does not read as text (it expects ``text_completion``), so the check uses the chat endpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from kvtide_server import start_kvtide, stop_kvtide
from peers import BENCH, PEERS_DIR, REPO, SERVED_MODEL_NAME, model_dir

AIPERF_VERSION = "0.13.0"
AIPERF_VENV = PEERS_DIR / "aiperf"
AIPERF = AIPERF_VENV / "bin" / "aiperf"
KVTIDE = REPO / ".venv" / "bin" / "kvtide"
TOLERANCE = 0.10


def ensure_aiperf() -> Path:
    """Create bench/peers/aiperf with aiperf from PyPI unless it already runs."""
    if AIPERF.exists() and subprocess.run([str(AIPERF), "--version"], capture_output=True, timeout=300).returncode == 0:
        return AIPERF
    print(f"aiperf venv {AIPERF_VENV}: creating (minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(AIPERF_VENV)], check=True)
    subprocess.run([str(AIPERF_VENV / "bin" / "python"), "-m", "pip", "install", "-q", f"aiperf=={AIPERF_VERSION}"], check=True)
    return AIPERF


@dataclass(frozen=True)
class Measured:
    """One tool's numbers from one run, in ms and tokens/s."""

    ttft_ms: dict[str, float]
    """mean, p50, p90."""
    tpot_ms: dict[str, float]
    """Per request: (last token - first token) / (tokens - 1); aiperf calls it inter_token_latency."""
    gap_ms: dict[str, float]
    """Every gap between streamed chunks, pooled; aiperf calls it inter_chunk_latency."""
    output_tok_s: float
    mean_osl: float
    """Output tokens per request as this tool counted them."""
    mean_isl: float
    duration_s: float
    client_cpu_s: float
    """CPU time of the tool's whole process tree over its run (start-up included)."""
    wall_s: float
    server_cpu_s: float = 0.0
    """CPU time of ``kvtide serve``'s process tree (Ray workers included) over the same run."""


def _three(d: dict, mean_key: str) -> dict[str, float]:
    return {"mean": d[mean_key], "p50": d["p50"], "p90": d["p90"]}


def parse_aiperf(run_dir: Path, client_cpu_s: float = 0.0, wall_s: float = 0.0, server_cpu_s: float = 0.0) -> Measured:
    """Read aiperf's profile_export_aiperf.json (times in ms)."""
    d = json.loads((run_dir / "profile_export_aiperf.json").read_text())
    for key in ("time_to_first_token", "inter_token_latency", "inter_chunk_latency"):
        if d.get(key, {}).get("unit") != "ms":
            raise ValueError(f"{run_dir}: aiperf metric {key!r} is {d.get(key)!r}, expected a unit of 'ms'")
    isl = d.get("usage_prompt_tokens") or d["input_sequence_length"]
    return Measured(
        _three(d["time_to_first_token"], "avg"), _three(d["inter_token_latency"], "avg"),
        _three(d["inter_chunk_latency"], "avg"), d["output_token_throughput"]["avg"],
        d["output_sequence_length"]["avg"], isl["avg"], d["benchmark_duration"]["avg"], client_cpu_s, wall_s, server_cpu_s,
    )  # fmt: skip


def parse_kvtide_bench(run_dir: Path, client_cpu_s: float = 0.0, wall_s: float = 0.0,
                       server_cpu_s: float = 0.0) -> Measured:  # fmt: skip
    """Read ``kvtide bench``'s summary.json (one target, one load point)."""
    rows = json.loads((run_dir / "summary.json").read_text())
    if len(rows) != 1:
        raise ValueError(f"{run_dir}/summary.json has {len(rows)} rows, expected 1 (one target, one load point)")
    r = rows[0]
    return Measured(
        _three(r["ttft_ms"], "mean"), _three(r["tpot_ms"], "mean"), _three(r["itl_ms"], "mean"),
        r["output_tokens_per_s"], r["mean_osl"], r["mean_isl"], r["duration_s"], client_cpu_s, wall_s, server_cpu_s,
    )  # fmt: skip


def rows_of(m: Measured) -> dict[str, float]:
    """The compared measures, by the name printed."""
    out = {}
    for name, d in (("TTFT", m.ttft_ms), ("ITL per request (TPOT)", m.tpot_ms), ("ITL pooled gaps", m.gap_ms)):
        for stat in ("mean", "p50", "p90"):
            out[f"{name} {stat} ms"] = d[stat]
    out["output tok/s"] = m.output_tok_s
    out["output tokens / request"] = m.mean_osl
    out["input tokens / request"] = m.mean_isl
    out["measured window s"] = m.duration_s
    out["client CPU s"] = m.client_cpu_s
    out["client wall s"] = m.wall_s
    out["client cores busy"] = m.client_cpu_s / m.wall_s if m.wall_s else 0.0
    out["server cores busy"] = m.server_cpu_s / m.wall_s if m.wall_s else 0.0
    out["server CPU s"] = m.server_cpu_s
    return out


COMPARED = ("TTFT", "ITL", "output tok/s")
"""Rows whose difference is judged against the 10% tolerance; the rest explain them."""


def table(aiperf: list[Measured], bench: list[Measured]) -> str:
    """Markdown table of the medians over pairs, with the relative difference."""
    a_rows = [rows_of(m) for m in aiperf]
    b_rows = [rows_of(m) for m in bench]
    lines = [f"| measure (median of {len(aiperf)} pairs) | aiperf | kvtide bench | (bench - aiperf) / aiperf | per pair |",
             "|---|---|---|---|---|"]  # fmt: skip
    for key in a_rows[0]:
        a = statistics.median(r[key] for r in a_rows)
        b = statistics.median(r[key] for r in b_rows)
        rel = (b - a) / a if a else float("nan")
        judged = key.startswith(COMPARED)
        flag = " **>10%**" if judged and abs(rel) > TOLERANCE else ""
        digits = 2 if key.endswith("busy") else 1
        pairs = ", ".join(f"{ra[key]:.{digits}f}/{rb[key]:.{digits}f}" for ra, rb in zip(a_rows, b_rows))
        lines.append(f"| {key} | {a:.{digits}f} | {b:.{digits}f} | {rel:+.1%}{flag} | {pairs} |")
    return "\n".join(lines)


class TreeCpu:
    """CPU seconds used by process trees, sampled every ``interval_s`` on a thread (a process
    that exits between samples loses at most one interval of its time)."""

    def __init__(self, roots: list[int], interval_s: float = 0.5) -> None:
        self.roots, self.interval_s = roots, interval_s
        self._seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        for root in self.roots:
            try:
                procs = [psutil.Process(root)]
                procs += procs[0].children(recursive=True)
            except psutil.Error:
                continue
            for proc in procs:
                try:
                    t = proc.cpu_times()
                    self._seen[(proc.pid, proc.create_time())] = t.user + t.system
                except psutil.Error:
                    pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> TreeCpu:
        self._sample()
        self._start = dict(self._seen)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def used_s(self) -> float:
        return sum(v - self._start.get(k, 0.0) for k, v in self._seen.items())


def _timed(cmd: list[str], log: Path, timeout_s: float, server_pid: int) -> tuple[float, float, float]:
    """Run ``cmd`` to the end; return its CPU seconds (whole tree), its wall seconds and the
    server tree's CPU seconds meanwhile."""
    t0 = time.monotonic()
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        with TreeCpu([proc.pid]) as client, TreeCpu([server_pid]) as server:
            try:
                rc = proc.wait(timeout=timeout_s)
            finally:
                if proc.poll() is None:
                    proc.kill()
    wall = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError(f"{cmd[0]} exited with {rc}; see {log}")
    return client.used_s, wall, server.used_s


def aiperf_command(args: argparse.Namespace, url: str, seed: int, out: Path) -> list[str]:
    return [
        str(AIPERF), "profile", "-m", SERVED_MODEL_NAME, "--url", url, "--endpoint-type", "chat", "--streaming",
        "--tokenizer", str(model_dir()), "--isl", str(args.isl), "--isl-stddev", "0", "--osl", str(args.osl),
        "--osl-stddev", "0", "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{args.osl}",
        "--concurrency", str(args.concurrency), "--request-count", str(args.num_requests), "--random-seed", str(seed),
        "--ui", "none", "--no-server-metrics", "--no-gpu-telemetry", "--workers-max", "1", "--record-processors", "1",
        "--artifact-dir", str(out),
    ]  # fmt: skip


def bench_command(args: argparse.Namespace, url: str, seed: int, out: Path, num_requests: int | None = None) -> list[str]:
    return [
        str(KVTIDE), "bench", "--backend", "openai", "--url", f"{url}/v1", "--label", "kvtide",
        "--model", SERVED_MODEL_NAME, "--endpoint", "chat", "--osl-control", "both", "--tokenizer", str(model_dir()),
        "--concurrency", str(args.concurrency), "--num-requests", str(num_requests or args.num_requests),
        "--warmup", "0", "--workload", "mix", "--mix", "short-long=1", "--short-isl", str(args.isl),
        "--long-osl", str(args.osl), "--jitter", "0", "--seed", str(seed), "--no-progress", "--out", str(out),
    ]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=2, help="aiperf / kvtide bench pairs (default 2)")
    p.add_argument("--isl", type=int, default=256)
    p.add_argument("--osl", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--http-port", type=int, default=8391)
    p.add_argument("--grpc-port", type=int, default=8392)
    p.add_argument("--seed", type=int, default=100, help="pair i uses seed + i in both tools")
    args = p.parse_args(argv)
    for name in ("pairs", "isl", "osl", "concurrency", "num_requests"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def main() -> None:
    args = parse_args()
    ensure_aiperf()
    out = BENCH / "out" / "aiperf" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    url = f"http://127.0.0.1:{args.http_port}"
    print(f"outputs in {out}", flush=True)
    server = start_kvtide(args.http_port, args.grpc_port, log_path=out / "kvtide-serve.log")
    aiperf_runs: list[Measured] = []
    bench_runs: list[Measured] = []
    loads: list[tuple[float, float, float]] = []
    try:
        print("warming the server up (unmeasured)", flush=True)
        _timed(bench_command(args, url, args.seed - 1, out / "warmup", num_requests=args.concurrency),
               out / "warmup.log", 900, server.pid)  # fmt: skip
        for i in range(args.pairs):
            seed = args.seed + i
            loads.append(os.getloadavg())
            cpu, wall, server_cpu = _timed(aiperf_command(args, url, seed, out / f"aiperf-{i}"),
                                           out / f"aiperf-{i}.log", 1800, server.pid)  # fmt: skip
            aiperf_runs.append(parse_aiperf(out / f"aiperf-{i}", cpu, wall, server_cpu))
            print(f"pair {i}: aiperf done ({wall:.0f} s, {cpu:.0f} CPU-s), load {loads[-1][0]:.1f}", flush=True)
            loads.append(os.getloadavg())
            cpu, wall, server_cpu = _timed(bench_command(args, url, seed, out / f"bench-{i}"),
                                           out / f"bench-{i}.log", 1800, server.pid)  # fmt: skip
            bench_runs.append(parse_kvtide_bench(out / f"bench-{i}", cpu, wall, server_cpu))
            print(f"pair {i}: kvtide bench done ({wall:.0f} s, {cpu:.0f} CPU-s), load {loads[-1][0]:.1f}", flush=True)
    finally:
        stop_kvtide(server)
    print()
    print(f"workload: chat, ISL {args.isl} (content; the chat template adds its own), OSL {args.osl} exactly, "
          f"concurrency {args.concurrency}, {args.num_requests} requests per run, {args.pairs} interleaved pairs")  # fmt: skip
    print(f"1-min load average before each run: {', '.join(f'{la[0]:.1f}' for la in loads)} "
          f"(2 cores; median {statistics.median(la[0] for la in loads):.1f})")  # fmt: skip
    print()
    print(table(aiperf_runs, bench_runs))
    (out / "table.md").write_text(table(aiperf_runs, bench_runs) + "\n")


if __name__ == "__main__":
    main()
