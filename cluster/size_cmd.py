"""``kvtide size``: what a model needs on a GPU, how many requests fit, how fast and at what cost.

Memory comes from the engine's own sizing function (``workers.sizing.plan_kv_cache``), speed
from a roofline (``workers.roofline``) or from an engine profile measured by ``kvtide bench``.
Every printed line is ``label: value``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

# NOTE: no kvtide.workers import at module level (it loads torch): cluster/cli.py sets the
# thread count before torch loads, and registers this command before that. ``run`` imports.
KNOWN_GPUS = "h100, h200, a100-40gb, a100-80gb, l4, l40s, a10g, b200"
"""workers/gpu_catalog.py's names, for the help text (a test keeps the two equal)."""
KNOWN_MODELS = "smollm2-135m, llama-3-8b, llama-3-70b, qwen2-7b"
"""workers/model_shapes.py's names, for the help text (a test keeps the two equal)."""

WEIGHT_DTYPES = ("fp32", "bf16", "fp16", "fp8", "int8")
"""fp8/int8 quantize the decoder's linear layers; their activations (and embeddings, LM
head, norms) stay in bf16."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("size", help="memory, capacity, speed and cost of a model on a GPU (no GPU needed)")
    p.add_argument("--model", help=f"HF directory, config.json, or a known name: {KNOWN_MODELS}")
    p.add_argument("--params", help="by hand, with --layers/--kv-heads/--head-dim: parameters (8e9, 8B, 135M)")
    p.add_argument("--layers", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--gpu", default="h100", help=f"one of: {KNOWN_GPUS}")
    p.add_argument("--gpu-cost-per-hour", type=float, help="$ per GPU-hour (default: the catalog's)")
    p.add_argument("--gpu-memory-gib", type=float, help="a measured total per GPU instead of the catalog's")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--weight-dtype", default="bf16", help=" | ".join(WEIGHT_DTYPES))
    p.add_argument("--kv-cache-dtype", default="auto", help="auto (the activations') | fp8 | int8")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--reserve-gib", type=float, help="measured activation reserve per GPU (default: estimated)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, help="default: the model's context (by hand: ISL + OSL)")
    p.add_argument("--max-num-batched-tokens", type=int, help="the step's token budget (default: the engine's)")
    p.add_argument("--max-num-seqs", type=int, help="sequences per step (default: the engine's)")
    p.add_argument("--isl", type=int, default=1024, help="input tokens per request")
    p.add_argument("--osl", type=int, default=256, help="output tokens per request")
    p.add_argument("--batch", type=int, default=32, help="decoding sequences for speed and cost")
    p.add_argument("--mfu", type=float, help="fraction of peak FLOP/s reached (default 0.5)")
    p.add_argument("--mbu", type=float, help="fraction of peak bandwidth reached (default 0.8)")
    p.add_argument("--profile", help="engine profile JSON from `kvtide bench`: measured speed instead of the roofline")
    p.set_defaults(func=run, threads=None)
    return p


def _params(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", text.lower())
    if not m:
        raise ValueError(f"--params {text!r} is not a count; write 8e9, 8030261248, 8B or 135M")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2)]
    if not 1 <= value < 1e16:
        raise ValueError(f"--params must be in [1, 1e16), got {text!r}")
    return round(value)


def _shape(args):
    from kvtide.workers import KNOWN_CONFIGS
    from kvtide.workers import ModelShape

    by_hand = [args.params, args.layers, args.kv_heads, args.head_dim]
    if args.model and any(v is not None for v in by_hand):
        raise ValueError("give --model or --params/--layers/--kv-heads/--head-dim, not both")
    if args.model:
        if args.model in KNOWN_CONFIGS:
            return args.model, ModelShape.from_hf_config(KNOWN_CONFIGS[args.model])
        path = Path(args.model).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(
                f"--model {args.model!r} is neither a known name ({', '.join(KNOWN_CONFIGS)}) "
                f"nor a Hugging Face directory or config.json"
            )
        return str(args.model), ModelShape.from_hf_config(json.loads(path.read_text()))
    if any(v is None for v in by_hand):
        raise ValueError("give --model, or all of --params, --layers, --kv-heads and --head-dim")
    for flag, value in [("--layers", args.layers), ("--kv-heads", args.kv_heads), ("--head-dim", args.head_dim)]:
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    context = args.max_model_len or args.isl + args.osl
    shape = ModelShape.by_hand(_params(args.params), args.layers, args.kv_heads, args.head_dim, context)
    return "by hand", shape


def _check(args) -> None:
    for flag in ("tp", "pp", "isl", "osl", "batch", "block_size", "max_num_batched_tokens", "max_num_seqs"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.block_size & (args.block_size - 1):
        raise ValueError(f"--block-size must be a power of two, got {args.block_size}")
    for flag in ("gpu_memory_utilization", "mfu", "mbu"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and 0 < value <= 1):
            raise ValueError(f"--{flag.replace('_', '-')} must be in (0, 1], got {value}")
    if args.weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"--weight-dtype must be one of {', '.join(WEIGHT_DTYPES)}; got {args.weight_dtype!r}")
    if args.kv_cache_dtype not in ("auto", "fp8", "int8"):
        raise ValueError(f"--kv-cache-dtype must be one of auto, fp8, int8; got {args.kv_cache_dtype!r}")
    if args.reserve_gib is not None and not args.reserve_gib >= 0:
        raise ValueError(f"--reserve-gib must be >= 0, got {args.reserve_gib}")


def _gpu(args):
    from kvtide.workers import get_gpu

    gpu = get_gpu(args.gpu)
    if args.gpu_cost_per_hour is not None:
        gpu = gpu.with_price(args.gpu_cost_per_hour)
    if args.gpu_memory_gib is not None:
        gpu = gpu.with_memory(round(args.gpu_memory_gib * 2**30))
    return gpu


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB ({n / 2**30:.2f} GiB)"


def _defaults(args) -> argparse.Namespace:
    from kvtide.workers import BANDWIDTH_EFFICIENCY, COMPUTE_EFFICIENCY, SchedulerConfig

    defaults = {
        "max_num_batched_tokens": SchedulerConfig.max_num_batched_tokens,
        "max_num_seqs": SchedulerConfig.max_num_seqs,
        "mfu": COMPUTE_EFFICIENCY,
        "mbu": BANDWIDTH_EFFICIENCY,
    }
    given = {k: v for k, v in vars(args).items() if not (k in defaults and v is None)}
    return argparse.Namespace(**{**defaults, **given})


def run(args) -> int:
    import torch

    from kvtide.workers import KV_CACHE_DTYPES, GpuMemory, ParallelLayout, plan_kv_cache

    args = _defaults(args)
    _check(args)
    name, shape = _shape(args)
    gpu = _gpu(args)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(args.weight_dtype, torch.bfloat16)
    quantization = args.weight_dtype if args.weight_dtype in ("fp8", "int8") else "none"
    kv_dtype = KV_CACHE_DTYPES.get(args.kv_cache_dtype)
    layout = ParallelLayout(args.tp, args.pp)
    try:
        layout.check(shape)
    except ValueError as exc:
        raise ValueError(f"--tp {args.tp} --pp {args.pp}: {exc}") from None
    max_model_len = args.max_model_len or shape.max_position
    if args.isl + args.osl > max_model_len:
        raise ValueError(
            f"--isl {args.isl} + --osl {args.osl} = {args.isl + args.osl} tokens exceeds max_model_len {max_model_len}"
        )
    reserve = None if args.reserve_gib is None else round(args.reserve_gib * 2**30)
    memory = GpuMemory(gpu.memory_bytes, args.gpu_memory_utilization, reserve)
    plan = plan_kv_cache(
        shape, dtype=dtype, block_size=args.block_size, memory=memory, layout=layout,
        quantization=quantization, kv_cache_dtype=kv_dtype,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
    )  # fmt: skip
    _print_memory(name, shape, gpu, args, plan)
    try:
        plan.check_fits(max_model_len)
    except ValueError as exc:
        print(f"does not fit: {exc}")
        return 1
    _print_speed(args, shape, layout, gpu, plan, dtype, quantization)
    return 0


def _print_memory(name: str, shape, gpu, args, plan) -> None:
    a = shape.args
    heads = f"{a.num_heads} heads, " if a is not None else ""
    count = f"{shape.num_params / 1e9:.2f} B" if shape.num_params >= 1e9 else f"{shape.num_params / 1e6:.2f} M"
    print(f"model: {name}: {count} parameters, {shape.num_layers} layers, {heads}"
          f"{shape.num_kv_heads} KV heads, head_dim {shape.head_dim}")  # fmt: skip
    print(f"gpu: {gpu.name} x {plan.layout.num_gpus} (tp={args.tp}, pp={args.pp}), "
          f"{_gb(gpu.memory_bytes)} each, the catalog's figure from the vendor data sheet")  # fmt: skip
    kv = args.kv_cache_dtype if args.kv_cache_dtype != "auto" else "as activations"
    print(f"dtypes: weights {args.weight_dtype}, KV cache {kv}")
    for s in plan.stages:
        layers = f"layers {s.share.layer_start}-{s.share.layer_end - 1}"
        where = "" if len(plan.stages) == 1 else f", stage {s.share.stage} ({layers})"
        print(f"weight memory per GPU{where}: {_gb(s.share.weight_bytes)}")
    b = plan.binding
    stage = "" if len(plan.stages) == 1 else f" of stage {b.share.stage}, which holds the fewest blocks"
    print(f"memory left after weights per GPU (before any reserve): {_gb(gpu.memory_bytes - b.share.weight_bytes)}")
    print(f"kv bytes per token: {plan.kv_bytes_per_token} ({plan.kv_bytes_per_token / 1024:.1f} KiB) whole model, "
          f"{b.share.kv_bytes_per_token} per GPU{stage}")  # fmt: skip
    how = "measured" if b.reserve_measured else (
        f"estimated at {args.max_num_batched_tokens} batched tokens, {args.max_num_seqs} sequences")
    print(f"activation reserve per GPU: {_gb(b.reserve_bytes)} ({how})")
    print(f"kv cache per GPU: {_gb(max(b.kv_bytes, 0))} = {args.gpu_memory_utilization:g} x memory - weights - reserve")
    print(f"kv cache tokens: {plan.num_tokens} ({plan.num_blocks} blocks of {plan.block_size})")
    per_request = -(-(args.isl + args.osl) // plan.block_size)
    print(f"concurrent requests: {plan.num_blocks // per_request} at ISL {args.isl} + OSL {args.osl} "
          f"({per_request} blocks each, no prefix sharing)")  # fmt: skip


def _print_speed(args, shape, layout, gpu, plan, dtype, quantization: str) -> None:
    from kvtide.workers import (
        EngineProfileMeasurement,
        cost_per_million_output_tokens,
        measured,
        peak_flops,
        roofline_speed,
    )

    if args.profile:
        profile = EngineProfileMeasurement.from_json(Path(args.profile).read_text())
        speed = measured(profile, args.batch, args.profile)
        if (profile.tp, profile.pp) != (args.tp, args.pp):
            print(f"note: the profile was measured at tp={profile.tp} pp={profile.pp}, not tp={args.tp} pp={args.pp}")
    else:
        peak = peak_flops(gpu, dtype, quantization)
        if quantization == "fp8" and gpu.fp8_flops is None:
            print(f"note: {gpu.name} has no FP8 tensor cores: fp8 weights are upcast, at bf16 FLOP/s")
        speed = roofline_speed(
            shape, layout, tuple(s.share for s in plan.stages), gpu, peak, isl=args.isl, osl=args.osl,
            batch=args.batch, max_num_batched_tokens=args.max_num_batched_tokens,
            compute_efficiency=args.mfu, bandwidth_efficiency=args.mbu,
        )  # fmt: skip
    print(f"speed source: {speed.source}")
    print(f"prefill: {speed.prefill_tokens_per_s:.0f} tokens/s")
    print(f"decode step at batch {args.batch}: {speed.decode_step_s * 1e3:.2f} ms, "
          f"{args.batch / speed.decode_step_s:.0f} output tokens/s")  # fmt: skip
    fits = plan.num_blocks // -(-(args.isl + args.osl) // plan.block_size)
    if args.batch > fits:
        print(f"note: batch {args.batch} exceeds the {fits} requests whose KV cache fits at this ISL/OSL")
    cost = cost_per_million_output_tokens(speed, gpu.usd_per_hour, layout.num_gpus, args.isl, args.osl, args.batch)
    print(f"cost per million output tokens: ${cost.decode_usd_per_m_output:.3f} decode only, "
          f"${cost.usd_per_m_output:.3f} with prefill "
          f"(${gpu.usd_per_hour:g}/GPU-hour x {layout.num_gpus}: {gpu.price_source})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvtide")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["size", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"kvtide: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
