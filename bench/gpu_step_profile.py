"""Where one bf16 decode step's time goes on a GPU: wall time per step, the CPU's Python
hotspots (cProfile) and torch's per-op CPU and CUDA times (torch.profiler), for one stream
and for 64. Run after ``make gpu-check`` (it uses that run's linked kvtide and random
SmolLM2-shaped checkpoint):

    python3 bench/gpu_step_profile.py [--steps 30] [--timing-only]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "build" / "gpu_check" / "site"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from kvtide.workers.engine import Engine  # noqa: E402
from kvtide.workers.sampling_params import SamplingParams  # noqa: E402


def python_speed() -> float:
    """Seconds for 10^7 iterations of an empty Python loop: how fast this host's CPU runs us."""
    t0 = time.perf_counter()
    for _ in range(10_000_000):
        pass
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--model", default=str(REPO / "build" / "gpu_check" / "smollm2-random"))
    p.add_argument("--timing-only", action="store_true", help="only the ms a step, no profiles")
    p.add_argument("--device", default="cuda", help="cpu: check this script on a machine without CUDA")
    args = p.parse_args()

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    print(f"empty loop 1e7: {python_speed():.2f} s; torch threads {torch.get_num_threads()}")
    eng = Engine.load(args.model, device=args.device, dtype="bfloat16", block_size=16, num_blocks=4096,
                      max_num_seqs=64, max_num_batched_tokens=2048)  # fmt: skip
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    print(f"backend {eng.config.attention_backend}")
    for streams in (1, 64):
        for i in range(streams):
            eng.add_request(f"s{streams}-{i}", [3 + (i * 31 + j) % (vocab - 3) for j in range(16)],
                            SamplingParams(temperature=0.0, max_tokens=3 * args.steps + 20, ignore_eos=True))
        for _ in range(5):
            eng.step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            eng.step()
        ms = (time.perf_counter() - t0) / args.steps * 1e3
        print(f"\n== {streams} streams: {ms:.2f} ms a step ({streams * 1e3 / ms:.0f} tok/s)")
        if args.timing_only:
            while eng.has_unfinished_requests():
                eng.step()
            continue
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            eng.step()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(22)
        print("\n".join(out.getvalue().splitlines()[:45]))
        cuda = args.device == "cuda"
        with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as tp:
            for _ in range(5):
                eng.step()
            sync()
        ka = tp.key_averages()
        print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
        if cuda:
            print(ka.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
        while eng.has_unfinished_requests():
            eng.step()


if __name__ == "__main__":
    main()
