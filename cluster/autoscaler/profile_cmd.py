"""``kvtide profile``: an engine profile for an observed ISL/OSL distribution.

    kvtide profile RUN.jsonl [MORE ...] [--model smollm2-135m | --hf-config config.json]
                   [--quantile 0.99] [--kv-cache-gib 1 | --gpu-memory-gib 80] [--tp 1 --pp 1]
                   [--cost-model bench/data/fleet_cost_model.json --itl-slo-s 0.5] [--yaml]

Reads a ``kvtide bench`` records JSONL (``isl`` and ``osl`` per line), the Azure CSVs or the
Mooncake JSONL (profile_build.py and traces.py say how), prints the distribution, the profile
and the concurrency it buys over the model-maximum profile, and with ``--yaml`` the profile
as an entry for the autoscale config's ``profiles``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from kvtide.cluster.autoscaler.traces import read_lengths


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile", help="size an engine profile for an observed ISL/OSL distribution",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", help="records JSONL (isl, osl), Azure CSV or Mooncake JSONL; .gz works")
    p.add_argument("--name", default="observed", help="the profile's name")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default="smollm2-135m", help="model name, HF directory or .gguf file")
    source.add_argument("--hf-config", help="the model's Hugging Face config.json instead of --model")
    p.add_argument("--quantile", type=float, default=0.99, help="of ISL+OSL, for max_model_len (default 0.99)")
    p.add_argument("--window", metavar="HH:MM-HH:MM", help="only requests arriving in this time of day (traces "
                   "timed from local midnight, such as bench/day_trace.py's): a season's mix")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every length by this first (the fleet "
                   "simulator replays the Azure traces at 0.25)")
    p.add_argument("--dtype", default="float32", help="the model's dtype: float32 | float16 | bfloat16")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8 | int8")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV budget per device (CPU; default 1)")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="memory of each GPU (instead of a KV budget)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--quantization", default="none", help="weights: none | fp8 | int8")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256, help="cap on the profile's max_num_seqs")
    p.add_argument("--cost-model", help="engine cost model JSON (bench/fleet_cost_model.py): chunk, weights, capacity")
    p.add_argument("--itl-slo-s", type=float, default=None, help="ITL p90 SLO: bounds the prefill chunk (with "
                   "--cost-model) and sizes the capacity")
    p.add_argument("--yaml", action="store_true", help="also print the profile as an autoscale config entry")
    p.set_defaults(func=run, threads=None)
    return p


def _model_config(args: argparse.Namespace) -> dict[str, Any]:
    if args.hf_config:
        with open(args.hf_config) as f:
            return json.load(f)
    from kvtide.workers import read_hf_config, resolve_model

    return read_hf_config(resolve_model(args.model))


def _window(text: str) -> tuple[float, float]:
    from kvtide.cluster.autoscaler.scheduled import Season

    start, sep, end = text.partition("-")
    if not sep:
        raise ValueError(f"--window: {text!r} is not HH:MM-HH:MM")
    try:
        season = Season("window", "any", start=start, end=end)
    except ValueError as exc:
        raise ValueError(f"--window {exc}") from None
    if season.end_minute <= season.start_minute:
        raise ValueError(f"--window: {text!r} must end after it starts (within one day)")
    return 60.0 * season.start_minute, 60.0 * season.end_minute


def _scaled(lengths: list[int], factor: float) -> list[int]:
    return [max(1, math.ceil(n * factor)) for n in lengths]


def run(args: argparse.Namespace) -> int:
    from kvtide.cluster.autoscaler.cost_model import EngineCostModel
    from kvtide.cluster.autoscaler.profile_build import ProfileOptions, build_profile

    if not (math.isfinite(args.scale) and args.scale > 0):
        raise ValueError(f"--scale: {args.scale} must be a finite number > 0")
    window = _window(args.window) if args.window else None
    isl: list[int] = []
    osl: list[int] = []
    for path in args.traces:
        i, o = read_lengths(path, window)
        isl += i
        osl += o
    if args.scale != 1.0:
        isl, osl = _scaled(isl, args.scale), _scaled(osl, args.scale)
    cost = None
    if args.cost_model:
        with open(args.cost_model) as f:
            cost = EngineCostModel.from_dict(json.load(f))
    options = ProfileOptions(
        name=args.name, quantile=args.quantile, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_gib=args.kv_cache_gib, gpu_memory_gib=args.gpu_memory_gib,
        gpu_memory_utilization=args.gpu_memory_utilization, quantization=args.quantization, tp=args.tp,
        pp=args.pp, block_size=args.block_size, max_num_seqs_cap=args.max_num_seqs, itl_slo_s=args.itl_slo_s,
    )
    report = build_profile(isl, osl, _model_config(args), options, cost)
    print(f"traces: {', '.join(args.traces)}" + (f" (lengths x{args.scale:g})" if args.scale != 1.0 else "")
          + (f", requests arriving {args.window}" if args.window else ""))
    print(report.describe())
    if args.yaml:
        import yaml

        print()
        yaml.safe_dump({"profiles": {report.profile.name: report.as_yaml_mapping()}}, sys.stdout, sort_keys=False)
    return 0
