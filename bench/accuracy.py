"""Accuracy of kvtide's reduced precisions on SmolLM2-135M: perplexity and greedy agreement.

Rows: fp32 (reference), fp8 KV cache, int8 KV cache, fp8 weights, int8 weights. Each row is
an engine built through ``Engine.load`` with that one option (``kv_cache_dtype`` or
``quantization``), everything else fp32.

- **Perplexity** on a fixed public-domain English text shipped in the repo
  (bench/data/alice_ch1.txt, about 3,000 tokens). The text is cut into windows of
  ``--window`` tokens; each window is run through the engine's own shard (the model with
  its paged KV cache and attention backend) in prefill chunks of ``--chunk`` tokens, so every
  chunk after the first attends to K/V read back from the cache: with a quantized cache,
  the quantized K/V is what is measured. The log-likelihood of every token but each window's
  first is summed; perplexity = exp(-sum / count). There is no prompt-logprobs API, so the
  batch is packed with ``pack_batch`` and the logits of every row are requested.
- **Greedy agreement** with the fp32 row: 8 prompts x 64 new tokens (``min_tokens`` keeps
  every output 64 long), all in one batch through ``Engine.step`` (decode attention reads
  the cache too). Reported: outputs identical to fp32, mean tokens before the first
  difference, and position-wise agreement.

A row whose option the engine does not know yet (``kv_cache_dtype`` before the quantized KV
cache landed) is reported as not run.

Run:  .venv/bin/python bench/accuracy.py [--rows fp32,kv-fp8,...] [--window 1024] [--chunk 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

from kvtide.cluster.threads import configure_threads

PARSER = argparse.ArgumentParser(description=__doc__.split("\n")[0])
PARSER.add_argument("--rows", default="fp32,kv-fp8,kv-int8,w-fp8,w-int8")
PARSER.add_argument("--window", type=int, default=1024, help="tokens per perplexity window")
PARSER.add_argument("--chunk", type=int, default=128, help="prefill chunk within a window")
PARSER.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
PARSER.add_argument("--text", default=str(Path(__file__).parent / "data" / "alice_ch1.txt"))
PARSER.add_argument("--threads", type=int, default=None, help="intra-op threads (default: kvtide's choice)")
ARGS = PARSER.parse_args()
# NOTE: OpenMP reads its thread settings once, when torch loads, so they are applied first.
configure_threads(ARGS.threads)

import torch

from kvtide.workers.engine import Engine
from kvtide.workers.quantization import weight_bytes
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.step_inputs import pack_batch
from kvtide.workers.tokenizer import Tokenizer

ROWS = {
    "fp32": ("fp32", {}),
    "kv-fp8": ("fp8 KV cache", {"kv_cache_dtype": "fp8"}),
    "kv-int8": ("int8 KV cache", {"kv_cache_dtype": "int8"}),
    "w-fp8": ("fp8 weights", {"quantization": "fp8"}),
    "w-int8": ("int8 weights", {"quantization": "int8"}),
}
PROMPTS = [
    "The history of the printing press begins",
    "Here is a simple recipe for bread:",
    "Photosynthesis is the process by which",
    "def fibonacci(n):",
    "The three most important things to know about the French Revolution are",
    "Once upon a time, in a small village by the sea,",
    "To configure a Linux firewall, first",
    "The main difference between a virus and a bacterium is",
]
BLOCK_SIZE = 16


def load(options: dict) -> Engine:
    return Engine.load(
        "smollm2-135m",
        dtype="float32",
        device="cpu",
        num_blocks=256,
        block_size=BLOCK_SIZE,
        max_num_seqs=len(PROMPTS),
        enable_prefix_caching=False,
        **options,
    )


@torch.inference_mode()
def perplexity(engine: Engine, token_ids: list[int], window: int, chunk: int) -> tuple[float, int]:
    """(perplexity, number of predicted tokens) over ``token_ids`` through the engine's shard.

    NOTE: uses the cache blocks directly, bypassing the block pool: run it only on an idle
    engine without prefix caching (nothing it caches may be read later).
    """
    shard = engine.runner.executor.shard
    device = engine.runner.executor.state.device
    nll, count = 0.0, 0
    for w0 in range(0, len(token_ids) - 1, window):
        win = token_ids[w0 : w0 + window]
        table = list(range(-(-len(win) // BLOCK_SIZE)))
        for start in range(0, len(win) - 1, chunk):
            piece = win[start : start + chunk]
            inputs = pack_batch([(piece, start, table, True)], (), BLOCK_SIZE, device)
            inputs = dataclasses.replace(inputs, logits_indices=torch.arange(len(piece), device=device))
            logits = shard.forward(inputs)  # [len(piece), vocab] float32
            targets = win[start + 1 : start + len(piece) + 1]  # the last piece has one fewer
            logprobs = torch.log_softmax(logits[: len(targets)], dim=-1)
            picked = logprobs.gather(1, torch.tensor(targets, device=device)[:, None])
            nll -= picked.sum().item()
            count += len(targets)
    return math.exp(nll / count), count


def greedy(engine: Engine, new_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"p{i}", prompt, params)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for d in engine.step():
            out.setdefault(d.request_id, []).extend(d.token_ids)
    return [out[f"p{i}"] for i in range(len(PROMPTS))]


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[int, float, float]:
    """(identical outputs, mean tokens before the first difference, position-wise agreement)."""
    identical, prefixes, same, total = 0, [], 0, 0
    for r, g in zip(ref, got, strict=True):
        identical += r == g
        prefix = next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), min(len(r), len(g)))
        prefixes.append(prefix)
        same += sum(a == b for a, b in zip(r, g))
        total += len(r)
    return identical, sum(prefixes) / len(prefixes), same / total


def main() -> None:
    rows = ARGS.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    results = []
    reference: tuple[float, list[list[int]]] | None = None
    token_ids: list[int] = []
    for key in ["fp32", *[r for r in rows if r != "fp32"]]:
        name, options = ROWS[key]
        t0 = time.perf_counter()
        try:
            engine = load(options)
        except ValueError as exc:  # an option the engine does not have yet
            print(f"{name}: not run ({exc})")
            results.append((name, None))
            continue
        if not token_ids:
            token_ids = Tokenizer.from_dir(engine.config.model_dir).encode(Path(ARGS.text).read_text())
        outputs = greedy(engine, ARGS.new_tokens)  # first: perplexity() bypasses the block pool
        ppl, count = perplexity(engine, token_ids, ARGS.window, ARGS.chunk)
        mib = weight_bytes(engine.runner.executor.model) / 2**20
        kv = engine.config.kv_cache_bytes / engine.config.num_blocks / BLOCK_SIZE
        if reference is None:
            reference = (ppl, outputs)
        results.append((name, (ppl, count, agreement(reference[1], outputs), mib, kv)))
        print(f"{name}: perplexity {ppl:.4f} over {count} tokens, {time.perf_counter() - t0:.0f} s", flush=True)
        del engine

    print(
        f"\nSmolLM2-135M-Instruct, {Path(ARGS.text).name} ({len(token_ids)} tokens), window {ARGS.window}, "
        f"chunk {ARGS.chunk}; greedy: {len(PROMPTS)} prompts x {ARGS.new_tokens} tokens vs fp32\n"
    )
    header = (
        "| row | perplexity | vs fp32 | identical outputs | mean tokens to first diff "
        "| position agreement | weight MiB | KV bytes/token |"
    )
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base_ppl = reference[0] if reference else float("nan")
    for name, r in results:
        if r is None:
            print(f"| {name} | not run | | | | | | |")
            continue
        ppl, _, (identical, prefix, pos), mib, kv = r
        print(
            f"| {name} | {ppl:.4f} | {100 * (ppl / base_ppl - 1):+.2f}% | {identical}/{len(PROMPTS)} "
            f"| {prefix:.1f} | {100 * pos:.1f}% | {mib:.1f} | {kv:.0f} |"
        )


if __name__ == "__main__":
    main()
