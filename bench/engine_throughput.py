"""kvtide vs Hugging Face transformers on CPU (fp32, SmolLM2-135M), and this machine's ceilings.

Prints, in one run:
  (a) mixed workload: fixed-seed requests with heavy-tailed prompt (ISL) and output (OSL)
      lengths, run through kvtide (all submitted at once, continuous batching) and through
      transformers with static batching (left-padded batches, each generating until its longest
      request is done; only each request's own OSL tokens count as output). Several HF batch
      sizes are tried and the best one is the baseline.
  (b) single-stream decode tokens/s of both, prefill and first token excluded.
  (c) ceilings measured here: memory bandwidth, fp32 matmul rate, and kvtide's batch-1 decode
      step against the memory-bound floor (weight bytes / read bandwidth).

Run:  .venv/bin/python bench/engine_throughput.py [--quick] [--num-requests N] [--threads T]
The last line is ``ratio_vs_transformers: N`` (kvtide / transformers output tok/s on (a)).
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvtide.cluster.threads import configure_threads


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~1 minute smoke run (smaller everything)")
    p.add_argument("--num-requests", type=int, default=None, help="mixed-workload requests (default 32, quick 8)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: kvtide's choice)")
    p.add_argument("--hf-batch-sizes", default=None, help="comma list of HF static batch sizes to try; the fastest is the baseline (default 8, quick 4)")
    p.add_argument("--pairs", type=int, default=None,
                   help="kvtide/transformers run pairs, interleaved so load drift hits both; the median ratio is reported (default 3, quick 1)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


# NOTE: OpenMP reads its thread settings once, when torch loads, so they are applied first.
ARGS = parse_args()
NUM_THREADS = configure_threads(ARGS.threads)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from kvtide.workers.engine import Engine  # noqa: E402
from kvtide.workers.model_files import resolve_model  # noqa: E402
from kvtide.workers.sampling_params import SamplingParams  # noqa: E402

MODEL = "smollm2-135m"
ISL_RANGE, ISL_MEDIAN = (16, 512), 64
OSL_RANGE, OSL_MEDIAN = (8, 192), 24
QUICK_ISL_RANGE, QUICK_OSL_RANGE = (16, 256), (8, 64)
LOGNORMAL_SIGMA = 0.9  # heavy tail: p90 is ~3x the median


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    osls: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.osls)


@dataclass(frozen=True)
class StaticRun:
    wall_s: float
    batch_size: int
    num_prompt_pad_tokens: int
    """Left-padding slots prefilled beyond the batch's real prompt tokens."""
    num_wasted_decode_tokens: int
    """Tokens generated past a request's own OSL while its batch's longest finishes."""
    num_computed_tokens: int
    """All token slots the static batches computed (prompts padded + outputs padded)."""


def median_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def quantiles(xs: Sequence[int]) -> str:
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return f"min {s[0]}  median {statistics.median(s):g}  p90 {pick(0.9)}  max {s[-1]}"


def make_workload(
    num_requests: int, vocab_size: int, seed: int, isl_range: tuple[int, int], osl_range: tuple[int, int]
) -> Workload:
    rng = random.Random(seed)

    def length(median: int, lo_hi: tuple[int, int]) -> int:
        v = round(median * rng.lognormvariate(0.0, LOGNORMAL_SIGMA))
        return max(lo_hi[0], min(lo_hi[1], v))

    isls = [length(ISL_MEDIAN, isl_range) for _ in range(num_requests)]
    osls = [length(OSL_MEDIAN, osl_range) for _ in range(num_requests)]
    prompts = [[rng.randrange(vocab_size) for _ in range(n)] for n in isls]
    return Workload(prompts, osls)


# -- kvtide --------------------------------------------------------------------------------


def greedy(osl: int) -> SamplingParams:
    """Exactly ``osl`` greedy tokens (EOS is banned until then)."""
    return SamplingParams(temperature=0.0, max_tokens=osl, min_tokens=osl)


def run_kvtide(engine: Engine, workload: Workload) -> float:
    """Submit everything at once, step until done; returns wall seconds."""
    num_out = 0
    t0 = time.perf_counter()
    for i, (prompt, osl) in enumerate(zip(workload.prompts, workload.osls, strict=True)):
        engine.add_request(f"mixed-{i}", prompt, greedy(osl))
    while engine.has_unfinished_requests():
        num_out += sum(len(d.token_ids) for d in engine.step())
    wall = time.perf_counter() - t0
    assert num_out == workload.num_output_tokens, (num_out, workload.num_output_tokens)
    return wall


def kvtide_single_stream(engine: Engine, prompt: list[int], num_new: int) -> tuple[list[float], list[int]]:
    """Per-step wall times (step 0 is the prefill that yields token 1) and the tokens."""
    engine.add_request("single", prompt, greedy(num_new))
    step_s, tokens = [], []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        deltas = engine.step()
        step_s.append(time.perf_counter() - t0)
        tokens += [t for d in deltas for t in d.token_ids]
    assert len(step_s) == num_new, len(step_s)
    return step_s, tokens


# -- transformers --------------------------------------------------------------------------


def hf_generate(model, prompts: Sequence[Sequence[int]], num_new: int, pad_id: int) -> torch.Tensor:
    """Left-padded greedy generate of exactly ``num_new`` tokens per row; returns new tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=num_new, min_new_tokens=num_new,
            do_sample=False, pad_token_id=pad_id,
        )
    return out[:, width:]


def run_hf_static(model, workload: Workload, batch_size: int, pad_id: int) -> StaticRun:
    """Fixed batches in arrival order; each runs until its longest request is done."""
    pad = wasted = computed = 0
    t0 = time.perf_counter()
    for start in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[start:start + batch_size]
        osls = workload.osls[start:start + batch_size]
        max_isl, max_osl = max(map(len, prompts)), max(osls)
        hf_generate(model, prompts, max_osl, pad_id)
        pad += len(prompts) * max_isl - sum(map(len, prompts))
        wasted += len(prompts) * max_osl - sum(osls)
        computed += len(prompts) * (max_isl + max_osl)
    return StaticRun(time.perf_counter() - t0, batch_size, pad, wasted, computed)


# -- machine ceilings ----------------------------------------------------------------------


def read_bandwidth_gbs(reps: int) -> tuple[float, float]:
    """(read GB/s from summing 1 GiB, copy GB/s counting read + write of 1 GiB), medians. The
    buffers are on 2 MiB pages, as kvtide's CPU weights are (``workers/huge_pages.py``)."""
    from kvtide.workers import huge_pages

    x, x_mapping = huge_pages.empty(2**28)
    y, y_mapping = huge_pages.empty(2**28)
    x.fill_(1.0)
    copy = 2 * x.numel() * x.element_size() / median_time(lambda: y.copy_(x), reps) / 1e9
    return read_gbs(x, reps), copy


def read_gbs(x: torch.Tensor, reps: int) -> float:
    """Read GB/s summing ``x``, median of ``reps``."""
    return x.numel() * x.element_size() / median_time(x.sum, reps) / 1e9


def matmul_gflops(m: int, k: int, n: int, reps: int, inner: int) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)

    def many() -> None:
        for _ in range(inner):
            torch.mm(a, b)

    many()  # warm-up
    return 2 * m * k * n * inner / median_time(many, reps) / 1e9


# -- report --------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    quick = args.quick
    num_requests = args.num_requests or (6 if quick else 24)
    isl_range, osl_range = (QUICK_ISL_RANGE, QUICK_OSL_RANGE) if quick else (ISL_RANGE, OSL_RANGE)
    batch_sizes = [int(b) for b in (args.hf_batch_sizes or ("4" if quick else "8")).split(",")]
    single_isl, single_new = 128, (16 if quick else 64)
    reps = 2 if quick else 3

    print(f"threads: {NUM_THREADS} (torch.get_num_threads()={torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), cores visible: "
          f"{len(os.sched_getaffinity(0))}, load average at start: {os.getloadavg()[0]:.2f}")
    print(f"torch {torch.__version__}, model {MODEL} fp32, seed {args.seed}{', QUICK' if quick else ''}")

    engine = Engine.load(MODEL, num_blocks=2048, max_num_seqs=64, max_num_batched_tokens=1024)
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32).eval()
    vocab_size, pad_id = engine.vocab_size, hf.generation_config.pad_token_id
    rng = random.Random(args.seed + 1)
    single_prompt = [rng.randrange(vocab_size) for _ in range(single_isl)]
    kvtide_single_stream(engine, single_prompt[:16], 4)  # warm-up both paths once
    hf_generate(hf, [single_prompt[:16]], 4, pad_id)

    print("\n(a) mixed workload")
    w = make_workload(num_requests, vocab_size, args.seed, isl_range, osl_range)
    print(f"  {num_requests} requests, random token ids, lognormal lengths (sigma {LOGNORMAL_SIGMA})")
    print(f"  ISL: {quantiles([len(p) for p in w.prompts])}   (clipped to {list(isl_range)})")
    print(f"  OSL: {quantiles(w.osls)}   (clipped to {list(osl_range)})")
    print(f"  total: {sum(map(len, w.prompts))} prompt tokens, {w.num_output_tokens} output tokens")
    pairs = args.pairs or (1 if quick else 3)
    ratios, kv_times, hf_times = [], [], []
    for pair in range(pairs):
        # NOTE: every kvtide run starts with an empty prefix cache; the prompts repeat per pair.
        assert engine.kv.reset_prefix_cache()
        kv_s = run_kvtide(engine, w)
        kv_times.append(kv_s)
        print(f"  pair {pair + 1}: kvtide (continuous batching, max_num_seqs 64, 1024 tokens/step): "
              f"{kv_s:.1f} s, {w.num_output_tokens / kv_s:.1f} out tok/s, {num_requests / kv_s:.3f} req/s, "
              f"{engine.stats().num_preemptions} preemptions")
        runs = []
        for bs in batch_sizes:
            r = run_hf_static(hf, w, bs, pad_id)
            runs.append(r)
            print(f"  pair {pair + 1}: transformers static batch {bs:>2}: {r.wall_s:.1f} s, "
                  f"{w.num_output_tokens / r.wall_s:.1f} out tok/s, {num_requests / r.wall_s:.3f} req/s; "
                  f"padding waste: {r.num_prompt_pad_tokens} prompt pad + {r.num_wasted_decode_tokens} "
                  f"surplus decode tokens = {(r.num_prompt_pad_tokens + r.num_wasted_decode_tokens) / r.num_computed_tokens:.0%} "
                  f"of {r.num_computed_tokens} computed token slots")
        best = min(runs, key=lambda r: r.wall_s)
        batch_sizes = [best.batch_size]  # later pairs time only the best static batch size
        hf_times.append(best.wall_s)
        ratios.append(best.wall_s / kv_s)  # same output tokens, so tok/s and req/s ratios are equal
    ratio = statistics.median(ratios)
    print(f"  baseline = best HF batch size {batch_sizes[0]}; kvtide/transformers per pair: "
          f"{', '.join(f'{r:.2f}x' for r in ratios)}; median {ratio:.2f}x output tok/s and req/s "
          f"(median times: kvtide {statistics.median(kv_times):.1f} s, transformers {statistics.median(hf_times):.1f} s)")

    print(f"\n(b) single stream: ISL {single_isl}, {single_new} new tokens, decode rate excludes prefill + first token")
    # Interleaved: each rep times kvtide, then transformers, so a load change hits both.
    kv_runs, kv_rates, hf_rates, hf_out = [], [], [], []
    for _ in range(reps):
        steps, tokens = kvtide_single_stream(engine, single_prompt, single_new)
        kv_runs.append((steps, tokens))
        kv_rates.append((single_new - 1) / sum(steps[1:]))
        t_n = median_time(lambda: hf_out.append(hf_generate(hf, [single_prompt], single_new, pad_id)), 1)
        t_1 = median_time(lambda: hf_generate(hf, [single_prompt], 1, pad_id), 1)
        hf_rates.append((single_new - 1) / (t_n - t_1))
    kv_steps_ms = [1e3 * statistics.median(steps[1:]) for steps, _ in kv_runs]
    single_ratios = [k / h for k, h in zip(kv_rates, hf_rates, strict=True)]
    hf_tokens = hf_out[0][0].tolist()
    kv_tokens = kv_runs[0][1]
    same = next((i for i, (a, b) in enumerate(zip(kv_tokens, hf_tokens)) if a != b), None)
    print(f"  kvtide: {statistics.median(kv_rates):.1f} tok/s (median of {reps}: time of steps 2..{single_new}; "
          f"median step {statistics.median(kv_steps_ms):.1f} ms)")
    print(f"  transformers: {statistics.median(hf_rates):.1f} tok/s (median of {reps}: "
          f"(N-1) / (t[generate {single_new}] - t[generate 1]))")
    print(f"  kvtide/transformers per pair: {', '.join(f'{r:.2f}x' for r in single_ratios)}; "
          f"median {statistics.median(single_ratios):.2f}x; greedy tokens "
          + ("identical" if same is None else f"diverge at token {same}"))

    print("\n(c) machine ceilings (medians)")
    read_gbs, copy_gbs = read_bandwidth_gbs(reps + 2)
    print(f"  memory bandwidth: read (sum of 1 GiB) {read_gbs:.1f} GB/s, copy 1 GiB {copy_gbs:.1f} GB/s (read+write)")
    print(f"  fp32 matmul 2048x2048x2048: {matmul_gflops(2048, 2048, 2048, reps + 2, 1):.1f} GFLOP/s")
    print(f"  fp32 matmul decode shape 1x576 @ 576x1536: {matmul_gflops(1, 576, 1536, reps + 2, 200):.1f} GFLOP/s")
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.executor.model.parameters())
    floor_ms = 1e3 * weight_bytes / (read_gbs * 1e9)
    step_ms = statistics.median(kv_steps_ms)
    print(f"  batch-1 decode floor: {weight_bytes / 1e6:.0f} MB weights / {read_gbs:.1f} GB/s = {floor_ms:.1f} ms; "
          f"kvtide step {step_ms:.1f} ms = {step_ms / floor_ms:.2f}x the floor")
    print("\n(d) what crosses from the sampling shard to the replica per decode step (Ray, when the shards are actors)")
    for batch in (1, 16, 64):
        delta_bytes, before, after = decode_step_bytes(engine, batch)
        print(f"  batch {batch:>2}: logits {before / 1024:.1f} KiB before (batch x vocab x 4 bytes, sampled on the replica) "
              f"-> {after} bytes now (token ids, sampled on the shard); the step's delta going in: {delta_bytes} bytes")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f} (on {os.cpu_count()} cores; other processes skew timings)")
    print(f"ratio_vs_transformers: {ratio:.2f}")


def decode_step_bytes(engine: Engine, batch: int) -> tuple[int, int, int]:
    """(pickled StepDelta in, logits-sized bytes the old design sent back, pickled StepOutput
    now sent back) for one decode step of ``batch`` greedy sequences."""
    seen: list[tuple[int, int]] = []
    executor = engine.runner.executor
    submit = executor.submit

    def spy(delta):
        handle = submit(delta)
        if delta.chunks and all(len(c.token_ids) == 1 for c in delta.chunks):
            seen.append((len(pickle.dumps(delta)), len(pickle.dumps(handle.result()))))
        return handle

    executor.submit = spy
    try:
        for i in range(batch):
            engine.add_request(f"bytes-{batch}-{i}", [100 + i] * 8, greedy(4))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        executor.submit = submit
    delta_bytes, after = seen[-1]
    return delta_bytes, batch * engine.config.vocab_size * 4, after


if __name__ == "__main__":
    main(ARGS)
