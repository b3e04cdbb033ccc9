"""Prefill attention of one step on the CPU in fp32: the compiled kernel (kernels/cpu_prefill.py,
one call per layer for every chunk of the step) against its twin (torch's SDPA per sequence,
reading a whole fresh prompt's K/V directly and gathering any cached prefix).

Run:  .venv/bin/python bench/prefill_kernel.py [--threads 2] [--reps 15]

SmolLM2-135M's heads (9 query heads, 3 KV heads, head_dim 64), a paged cache of 16-token
blocks, the query a view of a fused QKV output as the model hands it over. The two alternate
call by call; each line is the median of each and of their ratios over ``--reps`` pairs, plus
the largest difference between their outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

from kvtide.cluster.threads import configure_threads


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    return p.parse_args()


ARGS = parse_args()
configure_threads(ARGS.threads)  # the engine's OpenMP settings, before torch loads OpenMP

import torch  # noqa: E402

from kvtide.kernels import cpu_attention  # noqa: E402
from kvtide.kernels.attention_ref import paged_prefill_attention_ref, write_kv_ref  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
STEPS = {  # name -> (new query tokens, cached context before them) per sequence
    "10 prompts x 94 (peers.py mixed)": [(94, 0)] * 10,
    "4 prompts x 250": [(250, 0)] * 4,
    "1 prompt x 1000 (prefill-heavy)": [(1000, 0)],
    "512 after a 512-token chunk": [(512, 512)],
    "32 x 20 after 512 cached (shared prefix)": [(20, 512)] * 32,
}


def step_inputs(chunks: list[tuple[int, int]]) -> dict:
    seq_lens = [new + cached for new, cached in chunks]
    blocks = [-(-n // BLOCK) for n in seq_lens]
    k_cache = torch.randn(sum(blocks), KV_HEADS, BLOCK, HEAD_DIM)
    v_cache = torch.randn_like(k_cache)
    tables = torch.zeros(len(chunks), max(blocks), dtype=torch.int64)
    first = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = torch.arange(first, first + n)
        first += n
    starts = [0]
    for new, _ in chunks:
        starts.append(starts[-1] + new)
    qkv = torch.randn(starts[-1], (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    slots = [int(tables[i, p // BLOCK]) * BLOCK + p % BLOCK for i, (new, cached) in enumerate(chunks)
             for p in range(cached, cached + new)]  # fmt: skip
    k, v = k.reshape(-1, KV_HEADS, HEAD_DIM), v.reshape(-1, KV_HEADS, HEAD_DIM)
    write_kv_ref(k, v, k_cache, v_cache, torch.tensor(slots))  # as the layer does before attending
    return {
        "q": q.view(-1, HEADS, HEAD_DIM), "key": k, "value": v,
        "k_cache": k_cache, "v_cache": v_cache, "tables": tables, "starts": starts, "seq_lens": seq_lens,
    }  # fmt: skip


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    if not cpu_attention.available():
        raise SystemExit("the CPU attention kernels are not built: .venv/bin/python -m kvtide.kernels.cpu_build")
    scale = HEAD_DIM**-0.5
    print(f"{args.threads} threads, median of {args.reps} interleaved pairs")
    print(f"{'step':<42} {'twin ms':>8} {'kernel ms':>10} {'twin/kernel':>12} {'max diff':>9}")
    for name, chunks in STEPS.items():
        x = step_inputs(chunks)
        starts_t, lens_t = torch.tensor(x["starts"]), torch.tensor(x["seq_lens"])
        out_twin, out_kernel = torch.empty(x["q"].shape), torch.empty(x["q"].shape)

        def twin():
            paged_prefill_attention_ref(x["q"], x["k_cache"], x["v_cache"], x["tables"], x["starts"], x["seq_lens"],
                                        scale, out=out_twin, key=x["key"], value=x["value"])  # fmt: skip

        def kernel():
            cpu_attention.paged_prefill_attention_cpu(x["q"], x["k_cache"], x["v_cache"], x["tables"], starts_t,
                                                      lens_t, scale, out=out_kernel)  # fmt: skip

        times: dict[str, list[float]] = {"twin": [], "kernel": []}
        with torch.inference_mode():
            for rep in range(args.reps + 1):  # the first pair warms up
                for label, call in (("twin", twin), ("kernel", kernel)):
                    t0 = time.perf_counter()
                    call()
                    if rep:
                        times[label].append(time.perf_counter() - t0)
        ratio = statistics.median(a / b for a, b in zip(times["twin"], times["kernel"], strict=True))
        diff = (out_twin - out_kernel).abs().max().item()
        print(f"{name:<42} {1e3 * statistics.median(times['twin']):>8.2f} "
              f"{1e3 * statistics.median(times['kernel']):>10.2f} {ratio:>11.2f}x {diff:>9.1e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(ARGS)
