"""The linears of one SmolLM2 decode step, by batch rows: kvtide's small-M kernel against MKL and
oneDNN (the library vLLM's CPU build calls), fp32, 2 threads.

Run:  .venv/bin/python bench/linear_small_m.py [--rows 1,2,4,8,16,32,64,256,1024] [--reps 7]

Per row count M it times, interleaved rep by rep, the 120 linears of 30 layers (qkv 576->960,
o 576->576, gate_up 576->3072, down 1536->576) and the tied LM head (49152 x 576):
- ``mkl [in,out]``: ``x @ W_t`` on a row-major [in, out] copy (kvtide's layout before the kernel);
- ``mkl [out,in]``: ``x @ W.t()`` on the [out, in] weight kvtide now stores (MKL serves M > 16);
- ``onednn packed``: ``mkldnn._linear_pointwise`` on weights reordered once for oneDNN;
- ``kvtide``: ``kernels/cpu_linear.linear`` (only up to its MAX_ROWS, where kvtide uses it).
The LM head row compares ``(W @ x^T)^T`` (MKL, kvtide's choice above MAX_ROWS) with the kernel.
Medians in ms. Weights total 425 MB (layers) and 113 MB (head), so they come mostly from memory;
the floor printed is their bytes over the read bandwidth of a 1 GiB sum in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

from kvtide.cluster.threads import configure_threads


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,2,4,8,16,32,64,256,1024")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


ARGS = parse_args()
configure_threads(ARGS.threads)  # the engine's OpenMP settings, before torch loads OpenMP

import torch  # noqa: E402

from kvtide.kernels import cpu_linear  # noqa: E402

LAYER_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # [out, in]
NUM_LAYERS, VOCAB, HIDDEN = 30, 49152, 576


def read_gbs(reps: int = 5) -> float:
    x = torch.ones(2**28)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    weights = [[torch.randn(o, i) * 0.02 for o, i in LAYER_SHAPES] for _ in range(NUM_LAYERS)]
    row_major = [[w.t().contiguous() for w in layer] for layer in weights]
    packed = [[torch.ops.mkldnn._reorder_linear_weight(w, None) for w in layer] for layer in weights]
    head = torch.randn(VOCAB, HIDDEN) * 0.02
    layer_bytes = sum(w.numel() * 4 for layer in weights for w in layer)
    gbs = read_gbs()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernel built: {cpu_linear.available()}; "
          f"read bandwidth {gbs:.1f} GB/s: floor {1e3 * layer_bytes / gbs / 1e9:.1f} ms (layers), "
          f"{1e3 * head.numel() * 4 / gbs / 1e9:.1f} ms (head)")
    print(f"{'rows':>5} | {'mkl [in,out]':>12} {'mkl [out,in]':>12} {'onednn packed':>13} {'kvtide':>8} "
          f"| head: {'mkl':>6} {'kvtide':>7}   (ms, median of {args.reps})")
    for m in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(m, k) for k in {i for _, i in LAYER_SHAPES}}
        fns = {
            "mkl [in,out]": lambda: [xs[w.shape[0]] @ w for layer in row_major for w in layer],
            "mkl [out,in]": lambda: [xs[w.shape[1]] @ w.t() for layer in weights for w in layer],
            "onednn packed": lambda: [
                torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], pw, None, "none", [], "")
                for layer, pl in zip(weights, packed) for w, pw in zip(layer, pl)
            ],
            "head mkl": lambda: torch.mm(head, xs[HIDDEN].t()).t().contiguous(),
        }
        if m <= cpu_linear.MAX_ROWS and cpu_linear.available():
            fns["kvtide"] = lambda: [cpu_linear.linear(xs[w.shape[1]], w) for layer in weights for w in layer]
            fns["head kvtide"] = lambda: cpu_linear.linear(xs[HIDDEN], head)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():
            fn()
        for _ in range(args.reps):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(1e3 * (time.perf_counter() - t0))
        med = {k: statistics.median(v) for k, v in times.items()}
        cell = lambda k, w: f"{med[k]:{w}.1f}" if k in med else f"{'-':>{w}}"  # noqa: E731
        print(f"{m:>5} | {cell('mkl [in,out]', 12)} {cell('mkl [out,in]', 12)} {cell('onednn packed', 13)} "
              f"{cell('kvtide', 8)} | head: {cell('head mkl', 6)} {cell('head kvtide', 7)}", flush=True)


if __name__ == "__main__":
    main(ARGS)
