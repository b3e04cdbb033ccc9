"""Prefill and decode attention on the CPU in fp32: kvtide's ``_attend`` (torch's fused SDPA
kernel) against the explicit scores-matmul + causal mask + softmax it replaced.

Run:  .venv/bin/python bench/prefill_attention.py [--threads 2] [--reps 9]

SmolLM2-135M's heads (9 query heads, 3 KV heads, head_dim 64); one sequence per call, as the
engine's per-sequence prefill loop calls it. The two alternate call by call; each line is the
median over ``--reps`` pairs and their ratio, plus the largest difference between them.
"""

from __future__ import annotations

import argparse
import statistics
import time

from kvtide.cluster.threads import configure_threads


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=9)
    return p.parse_args()


ARGS = parse_args()
configure_threads(ARGS.threads)  # the engine's OpenMP settings, before torch loads OpenMP

import torch  # noqa: E402

from kvtide.kernels.attention_ref import _attend  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
SHAPES = ((1, 64), (1, 512), (1, 2048), (128, 128), (512, 512), (918, 918), (256, 1024), (512, 2048))
"""(query tokens, context tokens): decode, then prefill chunks with and without a cached prefix."""


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The replaced implementation: query heads folded per KV head into one matmul, a causal
    mask, softmax in fp32, a second matmul."""
    q_len, num_heads, head_dim = q.shape
    num_kv_heads, seq_len = k.shape[0], k.shape[1]
    group = num_heads // num_kv_heads
    qg = q.view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(num_kv_heads, group * q_len, head_dim)
    scores = torch.matmul(qg, k.transpose(1, 2)) * scale
    if q_len > 1:
        future = torch.ones(q_len, seq_len, dtype=torch.bool).triu_(seq_len - q_len + 1)
        scores.view(num_kv_heads, group, q_len, seq_len).masked_fill_(future, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim)


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    scale = HEAD_DIM**-0.5
    print(f"{args.threads} threads, median of {args.reps} interleaved pairs")
    print(f"{'query x context':>16} {'explicit ms':>12} {'sdpa ms':>9} {'ratio':>7} {'max diff':>9}")
    for q_len, seq_len in SHAPES:
        q = torch.randn(q_len, HEADS, HEAD_DIM)
        k, v = torch.randn(KV_HEADS, seq_len, HEAD_DIM), torch.randn(KV_HEADS, seq_len, HEAD_DIM)
        old, new = [], []
        with torch.inference_mode():
            for _ in range(args.reps + 1):  # the first pair warms up
                t0 = time.perf_counter()
                a = explicit_attention(q, k, v, scale)
                t1 = time.perf_counter()
                b = _attend(q, k, v, scale)
                t2 = time.perf_counter()
                old.append(t1 - t0)
                new.append(t2 - t1)
        o, n = statistics.median(old[1:]) * 1e3, statistics.median(new[1:]) * 1e3
        diff = (a - b).abs().max().item()
        print(f"{q_len:>7} x {seq_len:<6} {o:>12.2f} {n:>9.2f} {o / n:>6.2f}x {diff:>9.1e}")


if __name__ == "__main__":
    main(ARGS)
