"""The compiled CPU decode attention: its tiled path against its per-key path, fp32, 2 threads.

Run:  .venv/bin/python bench/decode_attention.py [--reps 30]

One layer of SmolLM2's decode attention (9 query heads, 3 KV heads, head_dim 64, 16-token
blocks) at the batches and context lengths a decode step sees: one stream; a mixed workload's
middle (8 x 300) and start (48 x 150); the shared-prefix workload (32 x 560, every sequence's
first 35 blocks the same physical blocks, as prefix caching leaves them) and the same lengths
unshared. The two paths (``tiled=True/False`` of ``paged_decode_attention_cpu``) alternate call
by call; medians in ms per layer, the step's 30 layers, and GFLOP/s (4 x heads x context x
head_dim per sequence).
"""

from __future__ import annotations

import argparse
import statistics
import time

from kvtide.cluster.threads import configure_threads

SHAPES = ((1, 200, False), (8, 300, False), (48, 150, False), (32, 560, True), (32, 560, False))
HEADS, KV_HEADS, HEAD_DIM, BLOCK, LAYERS = 9, 3, 64, 16, 30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    configure_threads(args.threads)
    import torch

    from kvtide.kernels import cpu_attention

    if not cpu_attention.available():
        raise SystemExit("the CPU attention kernel did not build here")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'batch x context':>22} | {'per-key':>8} {'tiled':>8} {'speedup':>8} | {'step (30 layers)':>17} | GFLOP/s tiled")
    for batch, context, shared in SHAPES:
        blocks_per_seq = -(-context // BLOCK)
        num_blocks = blocks_per_seq * (1 if shared else batch) + 8
        k_cache = torch.randn(num_blocks, KV_HEADS, BLOCK, HEAD_DIM)
        v_cache = torch.randn(num_blocks, KV_HEADS, BLOCK, HEAD_DIM)
        if shared:
            tables = torch.arange(blocks_per_seq).repeat(batch, 1)
        else:
            tables = torch.randperm(num_blocks)[: batch * blocks_per_seq].view(batch, blocks_per_seq)
        lens = torch.full((batch,), context)
        q = torch.randn(batch, HEADS, HEAD_DIM)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.reps):
            for tiled in (False, True):
                t0 = time.perf_counter()
                cpu_attention.paged_decode_attention_cpu(q, k_cache, v_cache, tables, lens, HEAD_DIM**-0.5, tiled)
                times[tiled].append(time.perf_counter() - t0)
        old, new = (statistics.median(times[t]) for t in (False, True))
        flops = 4 * batch * HEADS * context * HEAD_DIM
        label = f"{batch} x {context}" + (" shared" if shared else "")
        print(f"{label:>22} | {old * 1e3:8.3f} {new * 1e3:8.3f} {old / new:7.2f}x | "
              f"{old * LAYERS * 1e3:6.1f} -> {new * LAYERS * 1e3:6.1f} ms | {flops / new / 1e9:6.1f}")


if __name__ == "__main__":
    main()
