"""How fast the frontend answers ``/health`` while it tokenizes a 4 MB text.

A frontend (gateway, HTTP and gRPC servers on loopback; no replica: none is needed to
tokenize) with SmolLM2's real tokenizer. A client polls ``/health`` every 10 ms; meanwhile
another sends gRPC ``Tokenize`` requests of a 4 MB text (the uncapped path: a prompt that long
is refused from its size before tokenizing). Prints /health latency percentiles while the
tokenizer runs and, in the same run, with nothing else going on.

    .venv/bin/python bench/frontend_health.py [--mb 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import grpc
import httpx

from kvtide.cluster.frontend.gateway import Gateway
from kvtide.cluster.frontend.grpc_server import start_grpc_server
from kvtide.cluster.frontend.http_server import HttpServer
from kvtide.cluster.frontend.replicas import ReplicaSet
from kvtide.cluster.frontend.requests import FrontendConfig
from kvtide.proto import kvtide_pb2, kvtide_pb2_grpc
from kvtide.workers import RequestLimits, Tokenizer, resolve_model

TEXT = "The tide comes in and the tide goes out, and the sea keeps its own counsel. "


async def poll_health(url: str, stop: asyncio.Event) -> list[float]:
    latencies = []
    async with httpx.AsyncClient() as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = await client.get(url)
            assert r.status_code == 200
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.01)
    return latencies


def describe(name: str, latencies: list[float]) -> str:
    ms = sorted(x * 1000 for x in latencies)
    p = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return f"{name}: {len(ms)} probes, p50 {statistics.median(ms):.1f} ms, p99 {p(0.99):.1f} ms, max {ms[-1]:.1f} ms"


async def main(args) -> None:
    model_dir = resolve_model("smollm2-135m")
    limits = RequestLimits(max_model_len=8192, vocab_size=49152, max_num_seqs=64, num_blocks=1024, block_size=16)
    config = FrontendConfig(max_message_bytes=int((args.mb + 1) * 2**20))
    gateway = Gateway("smollm2-135m", limits, Tokenizer.from_dir(model_dir), ReplicaSet({}), config)
    http = await HttpServer.start(gateway, "127.0.0.1", 0, None, None, 1.0)
    grpc_server = await start_grpc_server(gateway, "127.0.0.1", 0)
    text = (TEXT * (int(args.mb * 1e6) // len(TEXT) + 1))[: int(args.mb * 1e6)]
    url = f"http://127.0.0.1:{http.port}/health"
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_server.port}") as channel:
            stub = kvtide_pb2_grpc.KvtideStub(channel)
            idle, busy, seconds = [], [], []
            for _ in range(args.rounds):
                stop = asyncio.Event()
                poller = asyncio.create_task(poll_health(url, stop))
                await asyncio.sleep(1.0)
                stop.set()
                idle += await poller
                stop = asyncio.Event()
                poller = asyncio.create_task(poll_health(url, stop))
                t0 = time.perf_counter()
                reply = await stub.Tokenize(kvtide_pb2.TokenizeRequest(text=text), timeout=300)
                seconds.append(time.perf_counter() - t0)
                stop.set()
                busy += await poller
            print(f"{args.mb:g} MB text: {len(reply.token_ids)} tokens, tokenized in median {statistics.median(seconds):.2f} s")
            print(describe("/health, idle", idle))
            print(describe("/health, while tokenizing", busy))
    finally:
        await grpc_server.stop(0)
        await http.stop()
        gateway.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
