"""kvtide's side of bench/peers.py: runs a job file through ``Engine.step()``, writes a result.

Run by peers.py in /work/main/.venv:  python bench/peer_kvtide_offline.py --job J --out R
Every token's arrival time comes from the engine-level loop: each ``step()`` returns the
tokens of that step, stamped when it returns. It also measures the weight-read floor of a
batch-1 decode step (weight bytes / read bandwidth, as bench/engine_throughput.py does).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from types import ModuleType

from peer_records import Job, Result, Run, Workload


def import_engine_throughput(threads: int) -> ModuleType:
    """bench/engine_throughput.py parses its command line and sets the thread count at
    import; give it only ``--threads`` (it must come before torch is imported)."""
    argv = sys.argv
    sys.argv = [argv[0], "--threads", str(threads)]
    try:
        return importlib.import_module("engine_throughput")
    finally:
        sys.argv = argv


def params(osl: int):
    from kvtide.workers.sampling_params import SamplingParams

    # The same settings the vLLM process gets: exactly `osl` greedy tokens.
    return SamplingParams(temperature=0.0, max_tokens=osl, min_tokens=osl, ignore_eos=True)


def run_workload(engine, w: Workload, tag: str) -> Run:
    """Submit every request at once, step until done; stamp each token when its step returns."""
    before = engine.stats()
    index = {f"{tag}-{i}": i for i in range(len(w.prompts))}
    times: list[list[float]] = [[] for _ in w.prompts]
    t0 = time.perf_counter()
    for rid, i in index.items():
        engine.add_request(rid, w.prompts[i], params(w.osls[i]))
    while engine.has_unfinished_requests():
        deltas = engine.step()
        now = time.perf_counter() - t0
        for d in deltas:
            times[index[d.request_id]].extend([now] * len(d.token_ids))
    after = engine.stats()
    return Run(
        workload=w.name,
        token_times_s=times,
        num_cached_prompt_tokens=after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens,
        num_preemptions=after.num_preemptions - before.num_preemptions,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--job", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    job = Job.load(args.job)
    et = import_engine_throughput(job.threads)  # sets the threads, then imports torch

    import torch

    from kvtide.workers import huge_pages
    from kvtide.workers.engine import Engine

    order = {} if job.queue_order_s_per_token is None else {"queue_order_s_per_token": job.queue_order_s_per_token}
    engine = Engine.load(
        job.model_dir,
        dtype="float32",
        enable_prefix_caching=job.enable_prefix_caching,
        max_num_seqs=job.max_num_seqs,
        max_num_batched_tokens=job.max_num_batched_tokens,
        kv_cache_memory_gib=float(job.kv_cache_gib),
        **order,
    )
    warm = Workload("warm-up", [list(range(100, 116)), list(range(200, 240))], [4, 4])
    run_workload(engine, warm, "warm-up")
    runs = []
    for k, w in enumerate(job.workloads):
        engine.kv.reset_prefix_cache()
        runs.append(run_workload(engine, w, f"{w.name}-{k}"))
    single, read_gbs = [], []
    if job.single_reps:  # the 1 GiB the floor's sum reads, on huge pages as the weights are
        probe, probe_mapping = huge_pages.empty(2**28)
        probe.fill_(1.0)
    for rep in range(job.single_reps):
        # NOTE: the host's read rate moves by 2x from minute to minute (34-66 GB/s on the Zen 4
        # host), so it is sampled beside every rep and the floor takes the fastest sample: the
        # strictest floor the run saw.
        read_gbs.append(et.read_gbs(probe, 3))
        one = Workload("single", [job.single_prompt], [job.single_new_tokens])
        engine.kv.reset_prefix_cache()
        single.append(run_workload(engine, one, f"single-{rep}").token_times_s[0])
    floor = {}
    if job.single_reps:
        read_gbs.append(et.read_gbs(probe, 3))
        del probe, probe_mapping
        model = engine.runner.executor.model
        floor = {
            "read_gbs": max(read_gbs),
            "read_gbs_slowest": min(read_gbs),
            "read_gbs_samples": read_gbs,  # before each rep, and after the last
            "weight_bytes": float(sum(q.numel() * q.element_size() for q in model.parameters())),
        }
    notes = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"attention backend {engine.config.attention_backend}, block size {engine.config.block_size}, "
        f"{engine.config.num_blocks} KV blocks, queue order {engine.scheduler.config.queue_order_s_per_token} s per "
        "prompt token (0: first come, first served)"
    ]
    Result("kvtide", _version(), runs, single, floor, notes).dump(args.out)


def _version() -> str:
    from importlib.metadata import version

    return version("kvtide")


if __name__ == "__main__":
    main()
