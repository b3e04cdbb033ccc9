"""How kvtide lays out its matmuls on CPU, measured.

Layers: F.linear(x, W[out, in]) vs x @ W_t[in, out] (kvtide stores W_t) on SmolLM2's layer
shapes. LM head (49152 x 576, tied to the embedding, so stored [vocab, hidden]):
F.linear(x, W) vs (W @ x^T)^T (what kvtide computes). Median of repeated calls, fp32, at
decode batch sizes. Run: .venv/bin/python bench/linear_layout.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {"qkv (576 -> 960)": (960, 576), "gate_up (576 -> 3072)": (3072, 576), "down (1536 -> 576)": (576, 1536)}
BATCHES = (1, 8, 16, 24, 32, 64)


def median_ms(fn, reps: int = 7, inner: int = 20) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':24} {'rows':>4} {'F.linear ms':>12} {'x @ W_t ms':>11} {'speedup':>8}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k)
        wt = w.t().contiguous()
        for m in BATCHES:
            x = torch.randn(m, k)
            a, b = median_ms(lambda: F.linear(x, w)), median_ms(lambda: x @ wt)
            print(f"{name:24} {m:>4} {a:>12.3f} {b:>11.3f} {a / b:>7.2f}x")
    head = torch.randn(49152, 576)
    print(f"\n{'LM head 576 -> 49152':24} {'rows':>4} {'F.linear ms':>12} {'(W @ x^T)^T':>11} {'speedup':>8}")
    for m in BATCHES:
        x = torch.randn(m, 576)
        a = median_ms(lambda: F.linear(x, head), reps=5, inner=3)
        b = median_ms(lambda: torch.mm(head, x.t()).t().contiguous(), reps=5, inner=3)
        print(f"{'':24} {m:>4} {a:>12.3f} {b:>11.3f} {a / b:>7.2f}x")


if __name__ == "__main__":
    main()
