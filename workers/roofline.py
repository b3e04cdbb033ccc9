"""Speed and cost of a replica: roofline estimates, or an engine profile measured by ``kvtide bench``.

Roofline, per GPU of each pipeline stage (``sizing.GpuShare``), with ctx the mean context
of a decoding sequence (ISL + OSL / 2) and peak the GPU's dense FLOP/s for the weights'
format (``peak_flops``):
- FLOPs per token: 2 x the parameters the GPU holds (the 2N rule, embeddings included),
  plus attention, 4 x layers x heads per GPU x head_dim x context (QK^T and PV; context
  ISL / 2 on average in a causal prefill, ctx in decode). A shape given by hand has no head
  count and gets no attention term.
- Prefill, one chunk of T = max_num_batched_tokens tokens: max(weight bytes / bandwidth,
  T x FLOPs per token / peak); tokens/s = T / that, the slowest stage's (stages pipeline).
- Decode, one micro-batch of b sequences: max((weight bytes + b x ctx x KV bytes per token)
  / bandwidth, b x FLOPs per token / peak). A step gives every sequence of the batch one
  token. With PP the engine keeps one micro-batch per stage in flight, so a batch of B runs
  as pp micro-batches and its step takes the longer of one micro-batch's trip through all
  stages and the busiest stage's work on all micro-batches.
Efficiencies scale the peaks: ``COMPUTE_EFFICIENCY`` (model FLOPs utilization) and
``BANDWIDTH_EFFICIENCY``. Every weight is counted as read once per step (the embedding table
too: an over-count of its share, 6.5% for Llama-3-8B), and communication is not counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from kvtide.workers.gpu_catalog import GpuSpec
from kvtide.workers.sizing import GpuShare, ModelShape, ParallelLayout

COMPUTE_EFFICIENCY = 0.5
"""Fraction of peak FLOP/s a large prefill reaches: 40-60% MFU is what tuned serving engines
report for dense models; 0.5 is the middle."""

BANDWIDTH_EFFICIENCY = 0.8
"""Fraction of peak memory bandwidth a decode step reaches (memory-bound kernels typically
sustain 70-90% of the data-sheet figure)."""


def peak_flops(gpu: GpuSpec, dtype: torch.dtype, quantization: str) -> float:
    """Dense FLOP/s for the matmuls: fp8 tensor cores for fp8 weights with bf16 activations
    (torch._scaled_mm, workers/quantization.py), fp32 cores for an fp32 model, else
    fp16/bf16 tensor cores (int8 is weight-only: upcast to the activation dtype)."""
    if quantization == "fp8" and dtype == torch.bfloat16 and gpu.fp8_flops is not None:
        return gpu.fp8_flops
    return gpu.fp32_flops if dtype == torch.float32 else gpu.bf16_flops


@dataclass(frozen=True)
class EngineProfileMeasurement:
    """An engine's measured speed for one model, GPU and layout (``kvtide bench`` writes it)."""

    model: str
    device: str
    tp: int
    pp: int
    dtype: str
    prefill_s_per_token: float
    """Seconds of prefill per input token at full chunks."""
    decode_step_s: tuple[tuple[int, float], ...]
    """(batch size, seconds for one decode step of that many sequences), batch ascending."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.prefill_s_per_token) and self.prefill_s_per_token > 0):
            raise ValueError(f"prefill_s_per_token must be finite and > 0, got {self.prefill_s_per_token}")
        batches = [b for b, _ in self.decode_step_s]
        if not batches or batches != sorted(set(batches)) or batches[0] < 1:
            raise ValueError(f"decode_step_s needs distinct batch sizes >= 1 in ascending order, got {batches}")
        for b, s in self.decode_step_s:
            if not (math.isfinite(s) and s > 0):
                raise ValueError(f"decode_step_s[{b}] must be finite and > 0, got {s}")

    @classmethod
    def from_json(cls, text: str) -> EngineProfileMeasurement:
        data = json.loads(text)
        fields = {"model", "device", "tp", "pp", "dtype", "prefill_s_per_token", "decode_step_s"}
        if not isinstance(data, dict) or set(data) != fields:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"an engine profile has exactly the keys {sorted(fields)}; got {got}")
        steps = tuple(sorted((int(b), float(s)) for b, s in data["decode_step_s"].items()))
        return cls(data["model"], data["device"], int(data["tp"]), int(data["pp"]), data["dtype"],
                   float(data["prefill_s_per_token"]), steps)  # fmt: skip

    def to_json(self) -> str:
        data = {
            "model": self.model, "device": self.device, "tp": self.tp, "pp": self.pp, "dtype": self.dtype,
            "prefill_s_per_token": self.prefill_s_per_token,
            "decode_step_s": {str(b): s for b, s in self.decode_step_s},
        }  # fmt: skip
        return json.dumps(data, indent=2)

    def decode_step_at(self, batch: int) -> float:
        """The measured step time at ``batch``, linear between the two nearest measured sizes."""
        points = self.decode_step_s
        if not points[0][0] <= batch <= points[-1][0]:
            raise ValueError(
                f"batch {batch} is outside the profile's measured batch sizes "
                f"{points[0][0]}-{points[-1][0]}; measure it, or ask for a batch in that range"
            )
        for (b0, s0), (b1, s1) in zip(points, points[1:]):  # noqa: B905 (one shorter on purpose)
            if b0 <= batch <= b1:
                return s0 + (s1 - s0) * (batch - b0) / (b1 - b0)
        return points[0][1]  # a single measured size, and batch is it


@dataclass(frozen=True)
class SpeedEstimate:
    prefill_tokens_per_s: float
    decode_step_s: float
    """One output token for each sequence of the batch."""
    source: str
    """How the numbers were obtained: the roofline and its bound, or the measured profile."""


def _attention_flops(shape: ModelShape, layout: ParallelLayout, share: GpuShare, context: float) -> float:
    if shape.args is None:
        return 0.0
    heads = shape.args.num_heads // layout.tp
    return 4 * (share.layer_end - share.layer_start) * heads * shape.head_dim * context


def roofline_speed(
    shape: ModelShape,
    layout: ParallelLayout,
    shares: tuple[GpuShare, ...],
    gpu: GpuSpec,
    peak: float,
    *,
    isl: int,
    osl: int,
    batch: int,
    max_num_batched_tokens: int,
    compute_efficiency: float = COMPUTE_EFFICIENCY,
    bandwidth_efficiency: float = BANDWIDTH_EFFICIENCY,
) -> SpeedEstimate:
    flops, bandwidth = peak * compute_efficiency, gpu.bandwidth_bytes_per_s * bandwidth_efficiency
    chunk = max_num_batched_tokens
    prefill = min(
        chunk / max(s.weight_bytes / bandwidth,
                    chunk * (2 * s.num_params + _attention_flops(shape, layout, s, isl / 2)) / flops)
        for s in shares
    )  # fmt: skip
    ctx = isl + osl / 2
    bounds = set()

    def step(share: GpuShare, b: int) -> float:
        memory = (share.weight_bytes + b * ctx * share.kv_bytes_per_token) / bandwidth
        compute = b * (2 * share.num_params + _attention_flops(shape, layout, share, ctx)) / flops
        bounds.add("memory" if memory >= compute else "compute")
        return max(memory, compute)

    micro = [n for n in (batch // layout.pp + (i < batch % layout.pp) for i in range(layout.pp)) if n]
    trip = max(sum(step(s, b) for s in shares) for b in micro)
    busiest = max(sum(step(s, b) for b in micro) for s in shares)
    source = (
        f"roofline: {compute_efficiency:g} x {peak / 1e12:g} TFLOP/s, {bandwidth_efficiency:g} x "
        f"{gpu.bandwidth_bytes_per_s / 1e9:g} GB/s; decode {'/'.join(sorted(bounds))}-bound"
    )
    return SpeedEstimate(prefill, max(trip, busiest), source)


def measured(profile: EngineProfileMeasurement, batch: int, path: str) -> SpeedEstimate:
    return SpeedEstimate(
        1 / profile.prefill_s_per_token,
        profile.decode_step_at(batch),
        f"measured: {path} ({profile.model} on {profile.device}, tp={profile.tp} pp={profile.pp}, {profile.dtype})",
    )


@dataclass(frozen=True)
class Cost:
    decode_usd_per_m_output: float
    """Decode steps only."""
    usd_per_m_output: float
    """Prefill of each request's ISL included, at the same batch."""


def cost_per_million_output_tokens(
    speed: SpeedEstimate, usd_per_gpu_hour: float, num_gpus: int, isl: int, osl: int, batch: int
) -> Cost:
    """$/hour for the replica's GPUs over its output tokens per hour. A batch cycle prefills
    ``batch`` prompts of ``isl`` tokens, then decodes ``osl`` steps."""
    usd_per_s = usd_per_gpu_hour * num_gpus / 3600
    decode = usd_per_s * speed.decode_step_s / batch * 1e6
    cycle_s = batch * isl / speed.prefill_tokens_per_s + osl * speed.decode_step_s
    return Cost(decode, usd_per_s * cycle_s / (batch * osl) * 1e6)
