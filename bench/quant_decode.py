"""Decode speed of SmolLM2-135M on CPU with fp32, int8 and fp8-stored linear weights.

CPU decode reads every weight once per step, so one-byte weights could run faster if the
kernel reads them without first writing an fp32 copy. This measures it: one engine per
weight format, all loaded up front; each repetition runs every format once, in turn
(interleaved, so load drift hits all of them alike), a greedy request per stream with ISL
prompt tokens and OSL new tokens. Decode tokens/s excludes the prefill step: streams x
(OSL - 1) tokens over the time of steps 2..OSL. Reported: the median over repetitions per
format and the median of the per-repetition ratios to fp32.

Formats: ``fp32``; ``int8`` (the engine's path: int8 stored, upcast to fp32 at use);
``int8-pack`` (the same int8 weights through torch.ops.aten._weight_int8pack_mm, torch's own
CPU kernel, registered here for the comparison); ``fp8`` (e4m3 stored, upcast at use: the CPU
path).

Run:  .venv/bin/python bench/quant_decode.py [--reps 5] [--streams 1,8] [--isl 64] [--osl 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

from kvtide.cluster.threads import configure_threads

PARSER = argparse.ArgumentParser(description=__doc__.split("\n")[0])
PARSER.add_argument("--reps", type=int, default=5, help="interleaved repetitions per format")
PARSER.add_argument("--streams", default="1,8", help="concurrent greedy streams, comma-separated")
PARSER.add_argument("--isl", type=int, default=64, help="prompt tokens per stream")
PARSER.add_argument("--osl", type=int, default=32, help="new tokens per stream")
PARSER.add_argument("--formats", default="fp32,int8,int8-pack,fp8")
PARSER.add_argument("--threads", type=int, default=None, help="intra-op threads (default: kvtide's choice)")
ARGS = PARSER.parse_args()
# NOTE: OpenMP reads its thread settings once, when torch loads, so they are applied first.
NUM_THREADS = configure_threads(ARGS.threads)

import torch

from kvtide.workers.config import EngineConfig, resolve
from kvtide.workers.engine import Engine
from kvtide.workers.model_files import resolve_model
from kvtide.workers.model_loader import load_model, read_hf_config
from kvtide.workers.quantization import (
    LINEAR_METHODS,
    Int8WeightOnly,
    weight_bytes,
)
from kvtide.workers.sampling_params import SamplingParams

# The int8pack_mm variant is a bench-only method, registered beside the engine's own.
LINEAR_METHODS.setdefault("int8-pack", lambda device: Int8WeightOnly(int8pack_mm=True))
QUANTIZATION = {"fp32": "none", "int8": "int8", "int8-pack": "int8-pack", "fp8": "fp8"}


def build(model_dir: str, fmt: str) -> Engine:
    config = EngineConfig.from_kwargs(model=model_dir, num_blocks=512, block_size=16, max_num_seqs=16)
    resolved = resolve(config, model_dir, read_hf_config(model_dir))
    return Engine.from_model(load_model(model_dir, quantization=QUANTIZATION[fmt]), resolved)


def decode_rate(engine: Engine, streams: int, isl: int, osl: int, seed: int) -> float:
    """Greedy decode tokens/s over steps 2..osl of ``streams`` concurrent requests."""
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0.0, max_tokens=osl, min_tokens=osl)
    for i in range(streams):
        prompt = torch.randint(100, 40000, (isl,), generator=g).tolist()
        engine.add_request(f"s{seed}-{i}", prompt, params)
    engine.step()  # prefill + first token
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    elapsed = time.perf_counter() - start
    assert steps == osl - 1, f"expected {osl - 1} decode steps, ran {steps}"
    return streams * (osl - 1) / elapsed


def main() -> None:
    model_dir = str(resolve_model("smollm2-135m"))
    formats = ARGS.formats.split(",")
    engines = {fmt: build(model_dir, fmt) for fmt in formats}
    print(f"threads: {NUM_THREADS}, torch {torch.__version__}, ISL {ARGS.isl}, OSL {ARGS.osl}, reps {ARGS.reps}")
    for fmt, engine in engines.items():
        print(f"  {fmt:12s} weight bytes {weight_bytes(engine.runner.executor.model) / 2**20:7.1f} MiB")
    for streams in [int(s) for s in ARGS.streams.split(",")]:
        rates: dict[str, list[float]] = {fmt: [] for fmt in formats}
        for engine in engines.values():  # warm-up: first-call allocations, kernel selection
            decode_rate(engine, streams, ARGS.isl, 4, seed=10_000)
        for rep in range(ARGS.reps):
            for fmt, engine in engines.items():
                rates[fmt].append(decode_rate(engine, streams, ARGS.isl, ARGS.osl, seed=rep))
        print(f"\n{streams} stream(s): decode tokens/s, median of {ARGS.reps} (per-rep ratio to fp32, median)")
        base = rates.get("fp32")
        for fmt in formats:
            line = f"  {fmt:12s} {statistics.median(rates[fmt]):8.1f} tok/s"
            if base is not None:
                ratio = statistics.median(r / b for r, b in zip(rates[fmt], base, strict=True))
                line += f"   x{ratio:.2f} vs fp32"
            print(line + "   [" + ", ".join(f"{r:.1f}" for r in rates[fmt]) + "]")


if __name__ == "__main__":
    main()
