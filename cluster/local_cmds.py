"""``kvtide generate`` and ``kvtide chat``: the engine in this process (``LLM``), or one request
through a running ``kvtide serve`` (``generate --server``)."""

from __future__ import annotations

import os
import sys
import time


def sampling_params(args):
    from kvtide.workers import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )


def _llm(args):
    from kvtide.cluster.cli import engine_config
    from kvtide.workers import LLM, Engine

    return LLM(engine=Engine.load(config=engine_config(args)))


def _stream(llm, request_id: str, prompt: str | list[int], params) -> str:
    """Run one request to completion, printing text as it arrives."""
    pieces, tokens, t0 = [], 0, time.perf_counter()
    for text, num_tokens in llm.stream(prompt, params, request_id):
        tokens += num_tokens
        pieces.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()
    elapsed = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"[{tokens} tokens in {elapsed:.2f} s, {tokens / elapsed:.1f} tok/s]", file=sys.stderr)
    return "".join(pieces)


def cmd_generate(args) -> int:
    if args.server:
        return _generate_remote(args)
    llm = _llm(args)
    prompt = args.prompt
    if not args.raw:
        prompt = llm.chat_token_ids([{"role": "user", "content": prompt}])
    try:
        _stream(llm, "generate", prompt, sampling_params(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _generate_remote(args) -> int:
    """``generate --server``: the same request through a running ``kvtide serve`` over gRPC."""
    import grpc

    from kvtide.cluster.client import KvtideClient

    params = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    if args.seed is not None:
        params["seed"] = args.seed
    messages = [{"role": "user", "content": args.prompt}]
    tokens, t0 = 0, time.perf_counter()
    with KvtideClient(args.server, api_key=args.api_key or os.environ.get("KVTIDE_API_KEY")) as client:
        stream = client.generate(args.prompt, **params) if args.raw else client.chat(messages, **params)
        try:
            for delta in stream:
                tokens += len(delta.token_ids)
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
    elapsed = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"[{tokens} tokens in {elapsed:.2f} s, {tokens / elapsed:.1f} tok/s]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    llm, params = _llm(args), sampling_params(args)
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
        prompt = llm.chat_token_ids(history)
        try:
            reply = _stream(llm, f"chat-{turn}", prompt, params)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
    return 0
