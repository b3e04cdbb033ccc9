"""The workload options of ``kvtide bench`` and the workload they build."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from kvtide.cluster.bench.backends import render_transcript
from kvtide.cluster.bench.corpus import load_corpus
from kvtide.cluster.bench.traces import TraceScaling, TraceWorkload, describe_scaling, read_trace, scale_trace
from kvtide.cluster.bench.workloads import (
    MultiTurn,
    PatternMix,
    SharedPrefix,
    Workload,
    parse_mix,
    standard_patterns,
)

WORKLOADS = ("mix", "shared-prefix", "multi-turn", "trace")


def add_workload_args(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload (seeded: the same --seed sends the same prompts)")
    w.add_argument("--workload", choices=WORKLOADS, default="mix")
    w.add_argument("--mix", default="all",
                   help="mix: patterns and weights, e.g. long-short=1,short-long=2 "
                        "(all: the four, equally)")  # fmt: skip
    w.add_argument("--short-isl", type=int, default=128, help="input tokens of the short patterns")
    w.add_argument("--long-isl", type=int, default=1024, help="input tokens of the long patterns")
    w.add_argument("--short-osl", type=int, default=32, help="output tokens of the short patterns")
    w.add_argument("--long-osl", type=int, default=256, help="output tokens of the long patterns")
    w.add_argument("--jitter", type=float, default=0.25, help="lengths drawn uniformly within ±this fraction")
    w.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: distinct system prompts")
    w.add_argument("--prefix-tokens", type=int, default=512, help="shared-prefix: tokens of each system prompt")
    w.add_argument("--question-tokens", type=int, default=64, help="shared-prefix: tokens after the prefix")
    w.add_argument("--turns", type=int, default=3, help="multi-turn: turns per chat")
    w.add_argument("--user-tokens", type=int, default=64, help="multi-turn: tokens of each user message")
    w.add_argument("--think-time-s", type=float, default=0.0, help="multi-turn: pause before each next turn")
    w.add_argument("--osl", type=int, default=64, help="shared-prefix and multi-turn: output tokens")
    w.add_argument("--trace", type=Path, help="trace: a bench JSONL, Mooncake JSONL or Azure CSV file")
    w.add_argument("--trace-format", choices=("auto", "bench", "mooncake", "azure"), default="auto")
    w.add_argument("--trace-block-tokens", type=int, default=512,
                   help="bench JSONL: tokens per hash_ids block (Mooncake: 512)")  # fmt: skip
    w.add_argument("--trace-start-s", type=float, default=0.0, help="trace: replay from this trace time")
    w.add_argument("--trace-duration-s", type=float, help="trace: replay this much trace time (default: all)")
    w.add_argument("--trace-sample", type=float, default=1.0,
                   help="trace: keep each request with this probability")  # fmt: skip
    w.add_argument("--time-scale", type=float, default=1.0, help="trace: multiply arrival times (0.1: 10x faster)")
    w.add_argument("--length-scale", type=float, default=1.0,
                   help="trace: multiply ISL, OSL and the prefix block size")  # fmt: skip
    w.add_argument("--max-model-len", type=int,
                   help="context to fit trace requests into and check workloads against (default: the server's)")
    w.add_argument("--tokenizer", help="HF directory with tokenizer.json (default: --model resolved by kvtide)")
    w.add_argument("--corpus", type=Path, nargs="+", help="prose files for the prompts (default: the repo's two)")


def _check_fits(workload: Workload, longest: int, max_len: int | None, what: str) -> Workload:
    if max_len is not None and longest > max_len:
        raise ValueError(f"{what} can reach {longest} tokens (input + output, at the top of the jitter), "
                         f"over the server's context of {max_len} tokens; shorten it or lower --jitter")  # fmt: skip
    return workload


def make_workload_factory(args) -> tuple[Callable[[int | None], Workload], Callable]:
    """The workload builder (it needs the context length) and the prompt token counter."""
    from kvtide.workers import Tokenizer, resolve_model

    tokenizer = Tokenizer.from_dir(args.tokenizer or resolve_model(args.model))
    corpus = load_corpus(tokenizer, args.corpus)
    chat = args.endpoint == "chat"

    def count_prompt(messages: tuple[tuple[str, str], ...]) -> int:
        if chat:
            text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages])
            return len(tokenizer.encode(text, add_special_tokens=False))
        return len(tokenizer.encode(render_transcript(messages)))

    def count_text(text: str) -> int:
        return len(tokenizer.encode(text))

    top = 1 + args.jitter

    def make(max_len: int | None) -> Workload:
        if args.workload == "mix":
            patterns = standard_patterns(args.short_isl, args.long_isl, args.short_osl, args.long_osl)
            mix = parse_mix(args.mix, patterns)
            longest = max(int(p.isl * top) + int(p.osl * top) + 1 for p, _ in mix)
            return _check_fits(PatternMix(corpus, mix, args.jitter, args.seed), longest, max_len, "--mix")
        if args.workload == "shared-prefix":
            w = SharedPrefix(corpus, args.num_prefixes, args.prefix_tokens, args.question_tokens, args.osl,
                             args.jitter, args.seed)  # fmt: skip
            longest = args.prefix_tokens + int(args.question_tokens * top) + int(args.osl * top) + 1
            return _check_fits(w, longest, max_len, "--workload shared-prefix")
        if args.workload == "multi-turn":
            w = MultiTurn(corpus, args.turns, args.user_tokens, args.osl, args.think_time_s, args.jitter, args.seed)
            longest = args.turns * (int(args.user_tokens * top) + int(args.osl * top) + 16)
            return _check_fits(w, longest, max_len, "--workload multi-turn (the last turn's whole chat)")
        if args.trace is None:
            raise ValueError("--workload trace needs --trace FILE")
        trace = read_trace(args.trace, args.trace_format, args.trace_block_tokens)
        scaling = TraceScaling(args.trace_start_s, args.trace_duration_s, args.trace_sample, args.time_scale,
                               args.length_scale, max_len, args.seed)  # fmt: skip
        scaled = scale_trace(trace, scaling)
        if not scaled.trace.requests:
            raise ValueError(f"no request of {args.trace} is left after the window and the sample")
        return TraceWorkload(scaled, corpus, count_text, args.seed, describe_scaling(trace, scaled, scaling))

    return make, count_prompt
