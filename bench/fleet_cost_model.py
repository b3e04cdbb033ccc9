"""Measure the fleet simulator's engine cost model on this machine (kvtide.cluster.autoscaler.cost_model).

A single-process SmolLM2-135M engine on one thread (a simulated replica has one CPU, as in
``routing_sim.py``), fp32 KV. Steps are timed in CPU time of this process (on a shared
machine, wall time mostly measures the neighbours), over ``--reps`` rounds of every
measurement, keeping each one's fastest; of:

- decode steps at batch 1, 4 and 16 with short contexts: a least-squares line gives
  ``base_s`` and ``per_decode_row_s``;
- decode steps at batch 4 with 512-, 1,024- and 2,048-token prompts: the slope over attended
  pairs is ``per_decode_pair_s``;
- the prefill of a 2,048-token prompt in chunks of ``--chunk`` (256) tokens, as the engine
  runs it: a line through each chunk's step time against its attended pairs (n*s +
  n(n+1)/2 at offset s) gives ``per_prefill_pair_s`` (slope) and, less ``base_s``,
  ``per_prefill_token_s`` (intercept / n). One-step prefills of whole long prompts are not
  the regime the simulator runs, and on this CPU they grow faster than quadratically
  (0.47 / 4.0 / 12.2 / 56.7 s at 256 / 1,024 / 2,048 / 4,096 tokens, 2026-12-02).

    .venv/bin/python bench/fleet_cost_model.py --out bench/data/fleet_cost_model.json   # ~3 min
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import asdict
from datetime import date

from kvtide.cluster.autoscaler.cost_model import EngineCostModel, prefill_pairs
from kvtide.cluster.threads import configure_threads


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) through (x, y) points."""
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def measure(chunk: int = 256, reps: int = 2) -> EngineCostModel:
    configure_threads(1)
    from kvtide.workers import Engine, SamplingParams

    engine = Engine.load("smollm2-135m", num_blocks=1100, max_num_batched_tokens=chunk, enable_prefix_caching=False)
    seq = iter(range(10**9))

    def prompt(n: int) -> list[int]:
        k = next(seq)
        return [1000 + (i * 7 + k * 13) % 30000 for i in range(n)]

    def timed_steps(batch: int, prompt_len: int, max_tokens: int) -> list[float]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)
        for _ in range(batch):
            engine.add_request(f"r{next(seq)}", prompt(prompt_len), params)
        times = []
        while engine.has_unfinished_requests():
            t = time.process_time()
            engine.step()
            times.append(time.process_time() - t)
        return times

    def decode_s(batch: int, prompt_len: int) -> float:
        num_prefill_steps = -(-batch * prompt_len // chunk)
        return min(timed_steps(batch, prompt_len, 10)[num_prefill_steps + 1:])

    timed_steps(1, 64, 4)  # warm-up: the first steps build the CPU kernel
    contexts = (512, 1024, 2048)
    prompt_len = 2048
    short: dict[int, float] = {}
    long4: dict[int, float] = {}
    chunks: dict[int, float] = {}
    for _ in range(reps):  # rounds over every measurement, so a busy spell spoils one round, not one point
        for b in (1, 4, 16):
            short[b] = min(short.get(b, math.inf), decode_s(b, 3))
        for n in contexts:
            long4[n] = min(long4.get(n, math.inf), decode_s(4, n))
        for i, t in enumerate(timed_steps(1, prompt_len, 1)[: prompt_len // chunk]):
            chunks[i * chunk] = min(chunks.get(i * chunk, math.inf), t)
    base, per_row = _line(list(short.items()))
    base, per_row = max(0.0, base), max(0.0, per_row)
    # Each row attends its prompt plus ~5 of the 10 measured tokens.
    _, per_decode_pair = _line([(4 * (n + 5), long4[n]) for n in contexts])
    intercept, per_pair = _line([(prefill_pairs(s, chunk), t) for s, t in chunks.items()])
    per_token = max(1e-6, (intercept - base) / chunk)
    return EngineCostModel(
        base_s=base, per_decode_row_s=per_row, per_prefill_token_s=per_token,
        per_prefill_pair_s=max(0.0, per_pair), per_decode_pair_s=max(0.0, per_decode_pair),
        source=(f"SmolLM2-135M fp32, 1 thread, {platform.processor() or platform.machine()}, {date.today()}: "
                f"decode {short[1] * 1e3:.1f}/{short[4] * 1e3:.1f}/{short[16] * 1e3:.1f} ms at batch 1/4/16, "
                + "/".join(f"{long4[n] * 1e3:.0f}" for n in contexts) + " ms at batch 4 x "
                + "/".join(map(str, contexts)) + f" context; {chunk}-token prefill chunks "
                + "/".join(f"{chunks[s]:.2f}" for s in sorted(chunks)) + " s at offsets 0.."
                + f"{max(chunks)}"),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/data/fleet_cost_model.json")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk (max_num_batched_tokens) measured")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (the fastest counts)")
    args = p.parse_args()
    cost = measure(args.chunk, args.reps)
    print(json.dumps(asdict(cost), indent=2))
    for n in (256, 1024, 2048):
        steps = [cost.step_s(0, args.chunk, num_prefill_pairs=prefill_pairs(s, args.chunk)) for s in range(0, n, args.chunk)]
        print(f"a {n}-token prompt in {args.chunk}-token chunks: {sum(steps):.2f} s")
    with open(args.out, "w") as f:
        json.dump(asdict(cost), f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
