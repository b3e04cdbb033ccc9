"""The ``kvtide`` command."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from kvtide.cluster.threads import configure_threads


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model name, HF directory or .gguf file")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: usable cores)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", action="store_true")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _build(args):
    from kvtide.workers.engine import Engine
    from kvtide.workers.sampling_params import SamplingParams

    engine = Engine.load(
        args.model,
        max_model_len=args.max_model_len,
        kv_cache_memory_gib=args.kv_cache_gib,
        block_size=args.block_size,
        enable_prefix_caching=not args.no_prefix_caching,
    )
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    return engine, params


def _stream(engine, request_id: str, prompt, params) -> str:
    """Run one request to completion, printing text as it arrives."""
    engine.add_request(request_id, prompt, params)
    pieces, tokens, t0 = [], 0, time.perf_counter()
    while engine.has_unfinished_requests():
        for d in engine.step():
            tokens += len(d.token_ids)
            pieces.append(d.text)
            sys.stdout.write(d.text)
            sys.stdout.flush()
    elapsed = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"[{tokens} tokens in {elapsed:.2f} s, {tokens / elapsed:.1f} tok/s]", file=sys.stderr)
    return "".join(pieces)


def cmd_generate(args) -> int:
    engine, params = _build(args)
    prompt = args.prompt
    if not args.raw:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    try:
        _stream(engine, "generate", prompt, params)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_chat(args) -> int:
    engine, params = _build(args)
    history: list[dict[str, str]] = []
    print("kvtide chat: type a message, Ctrl-D to quit.", file=sys.stderr)
    for turn in range(1_000_000):
        try:
            line = input("> ")
        except EOFError:
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt = engine.tokenizer.apply_chat_template(history)
        try:
            reply = _stream(engine, f"chat-{turn}", prompt, params)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvtide", description="kvtide LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a completion for one prompt, streaming")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    _engine_args(g)
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat through the model's chat template")
    _engine_args(c)
    _sampling_args(c)
    c.set_defaults(func=cmd_chat)
    args = parser.parse_args(argv)
    configure_threads(args.threads)  # before anything imports torch
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
