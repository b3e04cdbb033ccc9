"""Data-sheet figures of the GPUs ``kvtide size`` prices and sizes for.

Memory is the data sheet's figure in decimal GB (10^9 bytes), as the sheets print it. HBM
parts expose a little more than that (an 80 GB H100 reports about 79.6 GiB = 85.5e9 bytes),
GDDR6 parts with ECC on a little less, so pass a measured total when it matters
(``kvtide size --gpu-memory-gib``; the engine itself reads the device's total).

FLOP/s are dense tensor-core peaks (NVIDIA's sheets print the 2:4-sparse figure, twice
these, with an asterisk); fp32 is the non-tensor peak, which is what an fp32 model's matmuls
get (PyTorch leaves TF32 off for matmuls by default). ``fp8_flops`` is None where the GPU
has no FP8 tensor cores (Ampere: A100, A10G).

Prices are on-demand list prices per GPU-hour from the pages named beside each; they move
often, so every one is a default to override (``--gpu-cost-per-hour``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GB = 10**9
TB = 10**12


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int
    bandwidth_bytes_per_s: float
    """Peak memory bandwidth."""
    fp32_flops: float
    bf16_flops: float
    """Dense fp16/bf16 tensor-core FLOP/s (the two are equal on every GPU here)."""
    fp8_flops: float | None
    usd_per_hour: float
    """On-demand price of one GPU for an hour."""
    price_source: str

    def with_price(self, usd_per_hour: float) -> GpuSpec:
        if not usd_per_hour > 0:
            raise ValueError(f"--gpu-cost-per-hour must be > 0, got {usd_per_hour}")
        return dataclasses.replace(self, usd_per_hour=usd_per_hour, price_source="given on the command line")

    def with_memory(self, memory_bytes: int) -> GpuSpec:
        if memory_bytes < 1:
            raise ValueError(f"--gpu-memory-gib must be > 0, got {memory_bytes / 2**30:g}")
        return dataclasses.replace(self, memory_bytes=memory_bytes)


GPUS: dict[str, GpuSpec] = {
    # NVIDIA H100 Tensor Core GPU data sheet, SXM5 column: 80 GB HBM3, 3.35 TB/s, FP32 67 TF,
    # BF16/FP16 1,979 TF* and FP8 3,958 TF* (*with sparsity).
    "h100": GpuSpec("H100 SXM 80GB", 80 * GB, 3.35 * TB, 67e12, 989.5e12, 1979e12, 2.99,
                    "pricegpu.pages.dev/blog/h100-vs-a100-cloud-price: $2.49-3.99 on-demand, early 2026"),
    # NVIDIA H200 Tensor Core GPU data sheet, SXM column: 141 GB HBM3e, 4.8 TB/s; compute as H100 SXM.
    "h200": GpuSpec("H200 SXM 141GB", 141 * GB, 4.8 * TB, 67e12, 989.5e12, 1979e12, 3.50,
                    "mercatus-ai.com/blog/cloud-gpu-pricing: specialty clouds $3.50-4.50, May 2026"),
    # NVIDIA A100 Tensor Core GPU data sheet, SXM columns: 40 GB HBM2 at 1,555 GB/s, 80 GB HBM2e
    # at 2,039 GB/s; FP32 19.5 TF; BF16/FP16 312 TF (624* sparse); no FP8.
    "a100-40gb": GpuSpec("A100 SXM 40GB", 40 * GB, 1555 * GB, 19.5e12, 312e12, None, 1.29,
                         "Lambda's on-demand list (1x A100 SXM 40GB), 2024; no current page at hand"),
    "a100-80gb": GpuSpec("A100 SXM 80GB", 80 * GB, 2039 * GB, 19.5e12, 312e12, None, 1.79,
                         "pricegpu.pages.dev/blog/h100-vs-a100-cloud-price: $1.49-2.49 on-demand, early 2026"),
    # NVIDIA L4 data sheet: 24 GB GDDR6, 300 GB/s, FP32 30.3 TF, BF16/FP16 242 TF*, FP8 485 TF*.
    "l4": GpuSpec("L4 24GB", 24 * GB, 300 * GB, 30.3e12, 121e12, 242.5e12, 0.80,
                  "AWS g6.xlarge (1x L4) us-east-1 on-demand $0.8048, from memory of the AWS price list"),
    # NVIDIA L40S data sheet: 48 GB GDDR6, 864 GB/s, FP32 91.6 TF, BF16/FP16 362.05 | 733* TF,
    # FP8 733 | 1,466* TF.
    "l40s": GpuSpec("L40S 48GB", 48 * GB, 864 * GB, 91.6e12, 362.05e12, 733e12, 1.86,
                    "AWS g6e.xlarge (1x L40S) us-east-1 on-demand $1.861, from memory of the AWS price list"),
    # A10G: AWS's variant of the A10; NVIDIA publishes no data sheet for it. 24 GB GDDR6, 600 GB/s,
    # FP32 35 TF, BF16/FP16 70 TF dense (the A10 has 125), no FP8: baseten.co/blog/
    # nvidia-a10-vs-a10g-for-ml-model-inference.
    "a10g": GpuSpec("A10G 24GB", 24 * GB, 600 * GB, 35e12, 70e12, None, 1.006,
                    "AWS g5.xlarge (1x A10G) us-east-1 on-demand, June 2026 (factualminds.com EC2 pricing)"),
    # NVIDIA HGX B200 (8 GPUs, 1,000 W each): 1,440 GB HBM3e and 64 TB/s per board -> 180 GB and
    # 8 TB/s per GPU; per GPU FP32 80 TF, BF16/FP16 2,250 TF dense, FP8 4,500 TF dense
    # (glennklockwood.com/garden/processors/B200, from NVIDIA's Blackwell sheets).
    "b200": GpuSpec("B200 180GB", 180 * GB, 8 * TB, 80e12, 2250e12, 4500e12, 4.50,
                    "lyceum.technology B200 cloud pricing 2026: specialty clouds $4.50-6.00 on-demand"),
}  # fmt: skip


def get_gpu(name: str) -> GpuSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"--gpu {name!r} is not in the catalog; known GPUs: {', '.join(GPUS)}") from None
