"""Decode step time of SmolLM2 on CPU with and without the compiled per-token ops
(``kernels/cpu_ops.py``: fused RMSNorm + residual, in-place rotary, KV write).

One engine; each round runs the same decode steps with the ops on, then off (the torch
twins), alternating which goes first, so load drift hits both alike. Prints the median step
time of each at several batch sizes and the ratio.

Run:  .venv/bin/python bench/cpu_ops.py [--batch-sizes 1,8,24] [--rounds 5] [--steps 16]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

from kvtide.cluster.threads import configure_threads


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,8,24")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per round")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


ARGS = parse_args()
NUM_THREADS = configure_threads(ARGS.threads)

import torch  # noqa: E402

from kvtide.kernels import cpu_ops  # noqa: E402
from kvtide.workers.engine import Engine  # noqa: E402
from kvtide.workers.sampling_params import SamplingParams  # noqa: E402


def decode_steps(engine: Engine, batch: int, rng: random.Random) -> list[float]:
    """Prefill ``batch`` prompts, then time ARGS.steps decode steps."""
    params = SamplingParams(temperature=0.0, max_tokens=ARGS.steps + 2, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{rng.random()}-{i}", [rng.randrange(100, 40000) for _ in range(ARGS.prompt_len)], params)
    engine.step()  # the prefill
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times[: ARGS.steps]


def main() -> None:
    print(f"threads {NUM_THREADS} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), load average "
          f"{os.getloadavg()[0]:.2f}, torch {torch.__version__}, compiled ops available: {cpu_ops.available()}")
    engine = Engine.load("smollm2-135m", num_blocks=1024, max_num_seqs=64, max_num_batched_tokens=2048,
                         enable_prefix_caching=False)
    rng = random.Random(0)
    real_usable = cpu_ops.usable
    sizes = [int(b) for b in ARGS.batch_sizes.split(",")]
    times = {(b, on): [] for b in sizes for on in (True, False)}
    decode_steps(engine, 2, rng)  # warm-up
    for r in range(ARGS.rounds):
        for b in sizes:
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                cpu_ops.usable = real_usable if on else (lambda *t: False)
                times[(b, on)].extend(decode_steps(engine, b, rng))
    cpu_ops.usable = real_usable
    print(f"\nmedian decode step over {ARGS.rounds} rounds x {ARGS.steps} steps, {ARGS.prompt_len}-token prompts:")
    for b in sizes:
        on, off = statistics.median(times[(b, True)]), statistics.median(times[(b, False)])
        print(f"  batch {b:3d}: compiled ops {on * 1e3:7.2f} ms, torch twins {off * 1e3:7.2f} ms -> {off / on:.2f}x")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
