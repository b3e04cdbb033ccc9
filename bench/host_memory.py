"""glibc's malloc thresholds fixed (workers/host_memory.py) against glibc's adaptive defaults,
on bench/peers.py's mixed and prefill-heavy workloads through kvtide's engine, fp32 on the CPU.

Run:  .venv/bin/python bench/host_memory.py [--pairs 3] [--threads 2]

Each run is its own process (the thresholds are per process and cannot be unset), started
with ``KVTIDE_HOST_MALLOC=tuned`` or ``default``, alternating which goes first in each pair.
A run loads SmolLM2-135M, warms up on one mixed pass, then times the workloads the way
peers.py does (all requests at once, every token stamped when its step returns) and counts
the process's minor page faults over each. Prints per pair and the median of the ratios
tuned/default of wall time, TTFT p90 and faults.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

WORKLOADS = ("mixed", "prefill-heavy")


def child(threads: int) -> None:
    import peer_compare
    import peer_kvtide_offline
    from peer_records import summarize

    et = peer_kvtide_offline.import_engine_throughput(threads)  # thread settings, then torch

    from kvtide.workers import host_memory
    from kvtide.workers.engine import Engine
    from kvtide.workers.model_files import resolve_model

    engine = Engine.load(resolve_model("smollm2-135m"), dtype="float32", enable_prefix_caching=False,
                         max_num_seqs=64, max_num_batched_tokens=1024, kv_cache_memory_gib=2.0)
    workloads = peer_compare.build_workloads(et, list(WORKLOADS), engine.vocab_size, seed=0, quick=False)
    peer_kvtide_offline.run_workload(engine, workloads["mixed"], "warm")
    out = {"tuned": host_memory.keep_step_buffers()}
    for name in WORKLOADS:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        s = summarize(peer_kvtide_offline.run_workload(engine, workloads[name], name), workloads[name])
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        out[name] = {"wall_s": s.wall_s, "ttft_p90_ms": s.ttft_p90_ms, "itl_mean_ms": s.itl_mean_ms, "faults": faults}
    print("RESULT " + json.dumps(out), flush=True)


def run(mode: str, threads: int) -> dict:
    env = dict(os.environ, KVTIDE_HOST_MALLOC=mode)
    p = subprocess.run([sys.executable, __file__, "--child", "--threads", str(threads)], env=env,
                       capture_output=True, text=True, timeout=900)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"{mode} run failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    if result["tuned"] != (mode == "tuned"):
        raise RuntimeError(f"the {mode} run reports tuned={result['tuned']}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.threads)
        return
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    ratios: dict[str, dict[str, list[float]]] = {w: {"wall": [], "ttft_p90": []} for w in WORKLOADS}
    for i in range(args.pairs):
        order = ("tuned", "default") if i % 2 == 0 else ("default", "tuned")
        r = {mode: run(mode, args.threads) for mode in order}
        for w in WORKLOADS:
            t, d = r["tuned"][w], r["default"][w]
            ratios[w]["wall"].append(t["wall_s"] / d["wall_s"])
            ratios[w]["ttft_p90"].append(t["ttft_p90_ms"] / d["ttft_p90_ms"])
            print(f"pair-{i + 1} {w:13s} tuned/default: wall {t['wall_s']:.2f}/{d['wall_s']:.2f} s "
                  f"= {ratios[w]['wall'][-1]:.3f}x  TTFT p90 {t['ttft_p90_ms']:.0f}/{d['ttft_p90_ms']:.0f} ms "
                  f"= {ratios[w]['ttft_p90'][-1]:.3f}x  minor faults {t['faults']}/{d['faults']}", flush=True)
    for w in WORKLOADS:
        print(f"median of {args.pairs} {w:13s} tuned/default: wall {statistics.median(ratios[w]['wall']):.3f}x  "
              f"TTFT p90 {statistics.median(ratios[w]['ttft_p90']):.3f}x")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
