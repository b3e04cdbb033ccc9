"""The ``kvtide`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from kvtide.cluster import local_cmds, size_cmd
from kvtide.cluster.autoscaler import profile_cmd
from kvtide.cluster.bench import cli as bench_cli
from kvtide.cluster.threads import configure_threads


FLAGS = {
    "kv_cache_memory_gib": "--kv-cache-gib", "gpu_memory_utilization": "--gpu-memory-utilization",
    "max_num_batched_tokens": "--max-num-batched-tokens", "max_num_seqs": "--max-num-seqs",
    "max_model_len": "--max-model-len", "queue_order_s_per_token": "--queue-order-s-per-token", "block_size": "--block-size", "kv_cache_dtype": "--kv-cache-dtype",
    "quantization": "--quantization", "dtype": "--dtype", "device": "--device",
    "tensor_parallel_size": "--tp", "pipeline_parallel_size": "--pp",
}  # fmt: skip
"""Engine option -> the flag that sets it: errors name what the user typed."""


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model name, HF directory or .gguf file")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (serve: GPUs if the Ray cluster has any)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: usable cores)")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one step's batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024, help="tokens in one step (prefill chunks + decodes)")
    p.add_argument("--queue-order-s-per-token", type=float, default=0.001,
                   help="waiting requests are ordered by arrival time + this many seconds per prompt token "
                        "still to compute: shorter prefills first among close arrivals; 0 = first come, first served")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="CPU: the KV cache budget of each shard")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="GPU: the fraction of each GPU's memory the engine may use; the KV cache gets the rest "
                        "after weights and a measured step")  # fmt: skip
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8 | int8 (one scale per token and KV head)")
    p.add_argument("--quantization", default="none", help="weights of the linear layers: none | fp8 | int8")


def flag_error(exc: ValueError) -> str:
    """The message with each engine option it starts with renamed to its flag."""
    message = str(exc)
    for option, flag in FLAGS.items():
        if message.startswith(option + " ") or message.startswith(option + ":"):
            return flag + message[len(option) :]
    return message


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def engine_config(args):
    """The ``EngineConfig`` the engine flags describe (validated when it is resolved)."""
    from kvtide.workers import EngineConfig

    options = {"model": args.model, "device": args.device, "dtype": args.dtype,
               "kv_cache_memory_gib": args.kv_cache_gib, "gpu_memory_utilization": args.gpu_memory_utilization,
               "block_size": args.block_size, "enable_prefix_caching": not args.no_prefix_caching,
               "kv_cache_dtype": args.kv_cache_dtype, "quantization": args.quantization,
               "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
               "max_num_batched_tokens": args.max_num_batched_tokens,
               "queue_order_s_per_token": args.queue_order_s_per_token,
               "tensor_parallel_size": getattr(args, "tp", 1), "pipeline_parallel_size": getattr(args, "pp", 1)}  # fmt: skip
    return EngineConfig.from_kwargs(**options)


def cmd_serve(args) -> int:
    if args.address is None:
        # NOTE: before Ray is imported: otherwise Ray resolves 127.0.0.1 to the host's external
        # address and the private cluster listens there.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import asyncio

    from kvtide.cluster.frontend.requests import FrontendConfig
    from kvtide.cluster.serve import ServeConfig, StartupError, serve_forever

    api_keys = tuple(k for k in (args.api_key or os.environ.get("KVTIDE_API_KEY", "")).split(",") if k)
    try:
        config = ServeConfig(
            engine=engine_config(args), num_replicas=args.replicas,
            host=args.host, grpc_port=args.grpc_port, http_port=args.http_port, address=args.address,
            redis_url=args.redis_url, routing_policy=args.routing_policy,
            tls_cert=Path(args.tls_cert) if args.tls_cert else None, tls_key=Path(args.tls_key) if args.tls_key else None,
            drain_timeout_s=args.drain_timeout_s,
            frontend=FrontendConfig(api_keys=api_keys, max_in_flight=args.max_in_flight, max_queued=args.max_queued,
                                    request_timeout_s=args.request_timeout_s),
        )  # fmt: skip
    except ValueError as exc:
        print(f"kvtide: error: {flag_error(exc)}", file=sys.stderr)
        return 2
    autoscale = None
    if args.autoscale:
        from kvtide.cluster.autoscaler.config import load_config

        try:
            autoscale = load_config(args.autoscale)
        except (OSError, ValueError) as exc:
            print(f"kvtide: error: --autoscale: {exc}", file=sys.stderr)
            return 2
    try:
        asyncio.run(serve_forever(config, autoscale))
    except StartupError as exc:
        print(f"kvtide: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvtide", description="kvtide LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a completion for one prompt, streaming")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--server", metavar="HOST:PORT", help="send the request to a running `kvtide serve` (gRPC)")
    g.add_argument("--api-key", help="bearer token for --server (default: $KVTIDE_API_KEY)")
    _engine_args(g)
    _sampling_args(g)
    g.set_defaults(func=local_cmds.cmd_generate)
    c = sub.add_parser("chat", help="interactive chat through the model's chat template")
    _engine_args(c)
    _sampling_args(c)
    c.set_defaults(func=local_cmds.cmd_chat)
    s = sub.add_parser("serve", help="serve the model over gRPC and the OpenAI HTTP API until Ctrl-C")
    _engine_args(s)
    s.add_argument("--replicas", type=int, default=1, help="model replicas (each TP x PP Ray workers)")
    s.add_argument("--tp", type=int, default=1, help="tensor-parallel shards per pipeline stage")
    s.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages")
    s.add_argument("--host", default="127.0.0.1", help="address both servers bind")
    s.add_argument("--grpc-port", type=int, default=50051)
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    s.add_argument("--redis-url", help="cluster state store (default: an embedded redis-server on loopback)")
    s.add_argument("--routing-policy", default="kv_aware", help="kv_aware | round_robin | least_loaded")
    s.add_argument("--api-key", help="comma-separated bearer tokens clients must send (default: $KVTIDE_API_KEY)")
    s.add_argument("--tls-cert", help="PEM certificate: serve gRPC and HTTP over TLS (with --tls-key)")
    s.add_argument("--tls-key", help="PEM private key for --tls-cert")
    s.add_argument("--drain-timeout-s", type=float, default=30.0, help="on Ctrl-C/SIGTERM, how long in-flight requests may finish")
    s.add_argument("--max-in-flight", type=int, default=256, help="requests streaming at once")
    s.add_argument("--max-queued", type=int, default=256, help="requests waiting for admission; more get 429")
    s.add_argument("--request-timeout-s", type=float, default=None,
                   help="the server's deadline per request, admission wait included (gRPC: the earlier of this "
                        "and the client's); past it DEADLINE_EXCEEDED / HTTP 504 (default: none)")  # fmt: skip
    s.add_argument("--autoscale", metavar="FILE",
                   help="autoscale the replicas by this YAML of policies, profiles, SLOs and bounds (deploy/README.md); "
                        "its profiles size the engine, overriding the sizing flags")  # fmt: skip
    s.set_defaults(func=cmd_serve)
    size_cmd.add_parser(sub)
    bench_cli.add_parser(sub)
    profile_cmd.add_parser(sub)
    args = parser.parse_args(argv)
    configure_threads(getattr(args, "threads", None))  # before anything imports torch
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as exc:  # bad options: say which, without a traceback
        print(f"kvtide: error: {flag_error(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
