"""vLLM's side of bench/peers.py: runs a job file through ``LLMEngine.step()``, writes a result.

Run by peers.py in bench/peers/vllm:  python bench/peer_vllm_offline.py --job J --out R
The offline API as ``vllm.LLM`` builds it (its defaults: the engine core in its own
process, the model compiled, block size 128 on CPU), driven at the engine level
(``add_request`` + ``step()``, outputs as deltas) so every token's arrival is stamped when
the step that returns it comes back, as for kvtide. Imports nothing from kvtide.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from peer_records import Job, Result, Run, Workload


def threads_env(threads: int) -> None:
    """vLLM's CPU backend picks its OpenMP cores from VLLM_CPU_OMP_THREADS_BIND; its default
    ("auto") keeps one core for the frontend, so with 2 cores the model would get 1 thread.
    Bind ``threads`` cores explicitly (the way vLLM's CPU docs say to choose them) unless the
    caller set it."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}" if threads > 1 else "0")


def run_workload(engine, w: Workload, tag: str, shortest_first: bool = False) -> Run:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    index = {f"{tag}-{i}": i for i in range(len(w.prompts))}
    times: list[list[float]] = [[] for _ in w.prompts]
    cached = [0] * len(w.prompts)
    t0 = time.perf_counter()
    for rid, i in index.items():
        sp = SamplingParams(
            max_tokens=w.osls[i], min_tokens=w.osls[i], ignore_eos=True, temperature=0.0,
            output_kind=RequestOutputKind.DELTA,
        )
        priority = len(w.prompts[i]) if shortest_first else 0
        engine.add_request(rid, TokensPrompt(prompt_token_ids=w.prompts[i]), sp, priority=priority)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter() - t0
        for out in outputs:
            i = index[out.request_id]
            times[i].extend([now] * len(out.outputs[0].token_ids))
            cached[i] = max(cached[i], out.num_cached_tokens or 0)
    return Run(workload=w.name, token_times_s=times, num_cached_prompt_tokens=sum(cached))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--job", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    job = Job.load(args.job)
    threads_env(job.threads)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job.kv_cache_gib))

    import torch
    import vllm

    llm = vllm.LLM(
        model=job.model_dir,
        dtype="float32",
        enable_prefix_caching=job.enable_prefix_caching,
        max_num_seqs=job.max_num_seqs,
        max_num_batched_tokens=job.max_num_batched_tokens,
        scheduling_policy="priority" if job.vllm_shortest_first else "fcfs",
        seed=0,
    )
    engine = llm.llm_engine
    warm = Workload("warm-up", [list(range(100, 116)), list(range(200, 240))], [4, 4])
    run_workload(engine, warm, "warm-up")
    runs = []
    for k, w in enumerate(job.workloads):
        llm.reset_prefix_cache()
        runs.append(run_workload(engine, w, f"{w.name}-{k}", job.vllm_shortest_first))
    single = []
    for rep in range(job.single_reps):
        one = Workload("single", [job.single_prompt], [job.single_new_tokens])
        llm.reset_prefix_cache()
        single.append(run_workload(engine, one, f"single-{rep}").token_times_s[0])
    cache = engine.vllm_config.cache_config
    notes = [
        f"torch {torch.__version__}, VLLM_CPU_OMP_THREADS_BIND={os.environ['VLLM_CPU_OMP_THREADS_BIND']}, "
        f"block size {cache.block_size}, VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB, "
        f"V1 multiprocessing {os.environ.get('VLLM_ENABLE_V1_MULTIPROCESSING', '1 (default)')}, "
        f"scheduling policy {engine.vllm_config.scheduler_config.policy}"
        + (" (priority = prompt length)" if job.vllm_shortest_first else "")
    ]
    Result("vllm", vllm.__version__, runs, single, {}, notes).dump(args.out)
    del llm  # shuts the engine core down before the interpreter exits


if __name__ == "__main__":
    main()
