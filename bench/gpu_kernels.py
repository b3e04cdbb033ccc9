"""The Triton kernels on CUDA: time, achieved GB/s and TFLOP/s, against SDPA and the device.

For each kernel: median time over repeated calls (CUDA events), the bytes it must move and the
FLOPs it must do, as GB/s and TFLOP/s, and the same for
``torch.nn.functional.scaled_dot_product_attention`` on the same data laid out densely (no
paging; it gets K/V already gathered, so it is the bar to reach, not a like-for-like paged
kernel). The ceilings are measured here: device-to-device copy bandwidth and a large fp16/bf16
matmul. Decode and the KV write are bandwidth-bound (compare GB/s to the copy rate); prefill is
compute-bound (compare TFLOP/s to the matmul rate).

Run: .venv/bin/python bench/gpu_kernels.py [--dtype bfloat16|float16] [--kv-cache-dtype auto|int8|fp8]
On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial

import torch
import torch.nn.functional as F


def cuda_ms(fn, reps: int = 20) -> float:
    """Median milliseconds of ``fn()`` after a warm-up (compiles Triton kernels)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ceilings(dtype: torch.dtype) -> tuple[float, float]:
    """(copy GB/s counting read + write, matmul TFLOP/s) measured on this device."""
    x = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_gbs = 2 * x.numel() / cuda_ms(lambda: y.copy_(x)) / 1e6
    n = 8192
    a = torch.randn(n, n, dtype=dtype, device="cuda")
    b = torch.randn(n, n, dtype=dtype, device="cuda")
    mm_tflops = 2 * n**3 / cuda_ms(lambda: a @ b) / 1e9
    return copy_gbs, mm_tflops


def report(name: str, ms: float, nbytes: float, flops: float, copy_gbs: float, mm_tflops: float) -> None:
    gbs, tflops = nbytes / ms / 1e6, flops / ms / 1e9
    print(f"{name:<44} {ms:9.3f} ms {gbs:9.1f} GB/s ({gbs / copy_gbs:5.1%}) "
          f"{tflops:7.2f} TFLOP/s ({tflops / mm_tflops:5.1%})")


def paged(seq_lens, num_kv_heads, head_dim, block_size, dtype, kv_dtype):
    """A shuffled paged cache filled through the Triton write kernel, and the dense K/V."""
    from kvtide.kernels.kv_quant import allocate_kv_cache, split_kv_cache
    from kvtide.kernels.triton_kv_write import write_kv

    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq)
    perm = torch.randperm(num_blocks).tolist()
    tables, slots = [], []
    for n, nb in zip(seq_lens, per_seq):
        table = [perm.pop() for _ in range(nb)]
        slots += [table[p // block_size] * block_size + p % block_size for p in range(n)]
        tables.append(table + [0] * (max(per_seq) - nb))
    store = kv_dtype or dtype
    k_buf = allocate_kv_cache(num_blocks, num_kv_heads, block_size, head_dim, store, "cuda")
    v_buf = allocate_kv_cache(num_blocks, num_kv_heads, block_size, head_dim, store, "cuda")
    (k_cache, k_scale), (v_cache, v_scale) = split_kv_cache(k_buf, head_dim), split_kv_cache(v_buf, head_dim)
    key = torch.randn(len(slots), num_kv_heads, head_dim, dtype=dtype, device="cuda")
    value = torch.randn_like(key)
    slot_mapping = torch.tensor(slots, device="cuda")
    write = lambda: write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    write()
    tables = torch.tensor(tables, device="cuda")
    return (k_cache, v_cache, k_scale, v_scale, tables), key, value, write


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8"])
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_kernels.py needs a CUDA GPU (the Triton kernels compile for CUDA); none here, nothing to time.")
        return 0
    from kvtide.kernels.kv_quant import KV_CACHE_DTYPES, kv_bytes_per_row
    from kvtide.kernels.triton_decode import paged_decode_attention
    from kvtide.kernels.triton_norm_rope import rms_norm, rotary_embedding
    from kvtide.kernels.triton_prefill import paged_prefill_attention

    dtype = getattr(torch, args.dtype)
    kv_dtype = KV_CACHE_DTYPES.get(args.kv_cache_dtype)
    item = torch.empty((), dtype=dtype).element_size()
    copy_gbs, mm_tflops = ceilings(dtype)
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbs:.0f} GB/s, {args.dtype} matmul {mm_tflops:.1f} TFLOP/s; "
          f"KV cache {kv_dtype or dtype}")
    H, HKV, D, BS = 32, 8, 128, 16  # Llama-3-8B attention shapes
    row = kv_bytes_per_row(D, kv_dtype or dtype)

    for num_seqs, ctx in ((1, 8192), (32, 2048), (128, 1024)):
        lens = [ctx] * num_seqs
        cache, key, value, write = paged(lens, HKV, D, BS, dtype, kv_dtype)
        q = torch.randn(num_seqs, H, D, dtype=dtype, device="cuda")
        seq_lens = torch.tensor(lens, device="cuda")
        kv_bytes = 2 * sum(lens) * HKV * row
        flops = 4 * sum(lens) * H * D
        ms = cuda_ms(partial(paged_decode_attention, q, *cache[:2], cache[4], seq_lens, D**-0.5, *cache[2:4],
                            max_seq_len=ctx))
        report(f"decode {num_seqs} x {ctx} (triton, paged)", ms, kv_bytes, flops, copy_gbs, mm_tflops)
        k = key.view(num_seqs, ctx, HKV, D).transpose(1, 2)
        v = value.view(num_seqs, ctx, HKV, D).transpose(1, 2).contiguous()
        k = k.contiguous()
        qd = q.unsqueeze(2)
        ms = cuda_ms(partial(F.scaled_dot_product_attention, qd, k, v, enable_gqa=True))
        report(f"decode {num_seqs} x {ctx} (SDPA, dense)", ms, 2 * sum(lens) * HKV * D * item, flops,
               copy_gbs, mm_tflops)
        ms = cuda_ms(write)
        report(f"write_kv {sum(lens)} tokens", ms, 2 * sum(lens) * HKV * (D * item + row), 0, copy_gbs, mm_tflops)

    for num_seqs, ctx in ((1, 8192), (8, 2048)):
        lens = [ctx] * num_seqs
        cache, key, value, _ = paged(lens, HKV, D, BS, dtype, kv_dtype)
        q = torch.randn(sum(lens), H, D, dtype=dtype, device="cuda")
        qsl = torch.arange(num_seqs + 1, device="cuda") * ctx
        seq_lens = torch.tensor(lens, device="cuda")
        flops = num_seqs * 2 * H * D * ctx * ctx  # causal: half of 4 * H * D * ctx^2
        nbytes = 2 * sum(lens) * HKV * row + 2 * q.numel() * item
        ms = cuda_ms(partial(paged_prefill_attention, q, *cache[:2], cache[4], qsl, seq_lens, D**-0.5, *cache[2:4],
                            max_query_len=ctx, max_seq_len=ctx))
        report(f"prefill {num_seqs} x {ctx} (triton, paged)", ms, nbytes, flops, copy_gbs, mm_tflops)
        qs = q.view(num_seqs, ctx, H, D).transpose(1, 2).contiguous()
        k = key.view(num_seqs, ctx, HKV, D).transpose(1, 2).contiguous()
        v = value.view(num_seqs, ctx, HKV, D).transpose(1, 2).contiguous()
        ms = cuda_ms(partial(F.scaled_dot_product_attention, qs, k, v, is_causal=True, enable_gqa=True))
        report(f"prefill {num_seqs} x {ctx} (SDPA, dense)", ms, 2 * sum(lens) * HKV * D * item
               + 2 * q.numel() * item, flops, copy_gbs, mm_tflops)

    tokens, hidden = 8192, 4096
    x = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
    res = torch.randn_like(x)
    w = torch.ones(hidden, dtype=dtype, device="cuda")
    ms = cuda_ms(lambda: rms_norm(x, w, 1e-5, res))
    report(f"rms_norm + residual {tokens} x {hidden}", ms, 4 * x.numel() * item, 0, copy_gbs, mm_tflops)
    qr = torch.randn(tokens, H, D, dtype=dtype, device="cuda")
    kr = torch.randn(tokens, HKV, D, dtype=dtype, device="cuda")
    cos = torch.randn(tokens, 1, D, dtype=dtype, device="cuda")
    sin = torch.randn_like(cos)
    ms = cuda_ms(lambda: rotary_embedding(qr, kr, cos, sin))
    report(f"rotary {tokens} tokens", ms, 2 * (qr.numel() + kr.numel() + cos.numel()) * item, 0, copy_gbs, mm_tflops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
