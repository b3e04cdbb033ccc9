"""Hostile requests get a 400 (or INVALID_ARGUMENT) that names what was wrong, never a 500, and
the server keeps serving; tokenization never holds the event loop. A gateway over a fake
replica: a request that passes every check is served (200)."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import pytest

from kvtide.cluster.frontend.grpc_server import start_grpc_server
from kvtide.cluster.frontend.http_api import create_app
from kvtide.proto import kvtide_pb2
from tests.unit.frontend_fakes import KEY, FakeReplica, routed_gateway

HEADERS = {"Authorization": f"Bearer {KEY}"}
SURROGATE = '"\\ud800"'  # JSON text for a lone surrogate


def _gateway(**config):
    gw, _, _ = routed_gateway(FakeReplica(delay_s=0.0), **{"max_message_bytes": 4 * 2**20, **config})
    return gw


def _post(gw, path: str, raw: bytes) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, content=raw, headers={**HEADERS, "Content-Type": "application/json"})

    return asyncio.run(go())


def _chat(content: str = '"hello"', role: str = '"user"', stream: bool = False) -> bytes:
    return f'{{"messages": [{{"role": {role}, "content": {content}}}], "max_tokens": 2, "stream": {json.dumps(stream)}}}'.encode()


def _completion(prompt: str, stream: bool = False, extra: str = "") -> bytes:
    return f'{{"prompt": {prompt}, "max_tokens": 2, "stream": {json.dumps(stream)}{extra}}}'.encode()


CASES = [
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, "nests deeper"),
    ("/v1/chat/completions", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests deeper"),
    ("/v1/completions", _completion('"hello"', extra=', "max_tokens": ' + "9" * 5000), "max_tokens"),
    ("/v1/completions", _completion('"hello"', extra=', "seed": -' + "9" * 5000), "seed"),
    ("/v1/completions", _completion(SURROGATE), "prompt contains \\ud800"),
    ("/v1/completions", _completion(SURROGATE, stream=True), "prompt contains \\ud800"),
    ("/v1/completions", _completion(f'["hello", {SURROGATE}]'), "prompt[1]: prompt contains \\ud800"),
    ("/v1/chat/completions", _chat(content=SURROGATE), "messages[0].content contains \\ud800"),
    ("/v1/chat/completions", _chat(content=SURROGATE, stream=True), "messages[0].content contains \\ud800"),
    ("/v1/chat/completions", _chat(content=f'[{{"type": "text", "text": {SURROGATE}}}]'), "messages[0].content"),
    ("/v1/chat/completions", _chat(role=SURROGATE), "messages[0].role contains \\ud800"),
    ("/v1/chat/completions", _chat(role=SURROGATE, stream=True), "messages[0].role contains \\ud800"),
]


@pytest.mark.parametrize(("path", "raw", "needle"), CASES, ids=[f"{i}-{c[2][:20]}" for i, c in enumerate(CASES)])
def test_hostile_bodies_get_a_400_naming_the_field_and_the_server_goes_on(path, raw, needle):
    gw = _gateway()
    r = _post(gw, path, raw)
    assert r.status_code == 400, r.text[:500]
    assert needle in r.json()["error"]["message"], r.json()["error"]["message"][:500]
    ok = _post(gw, "/v1/completions", _completion('"hello"'))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3  # the fake's 3 tokens


def test_a_grpc_request_that_does_not_parse_gets_invalid_argument():
    gw = _gateway()

    async def go():
        server = await start_grpc_server(gw, "127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                metadata = (("authorization", f"Bearer {KEY}"),)
                # field 1 (model, a string) holding invalid UTF-8: proto3 refuses to parse it
                raw = channel.unary_stream("/kvtide.v1.Kvtide/Generate")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in raw(b"\x0a\x01\xff", metadata=metadata, timeout=10):
                        pass
                stub_call = channel.unary_stream(
                    "/kvtide.v1.Kvtide/Generate", request_serializer=kvtide_pb2.GenerateRequest.SerializeToString,
                    response_deserializer=kvtide_pb2.GenerateResponse.FromString,
                )  # fmt: skip
                request = kvtide_pb2.GenerateRequest(text="hello", params=kvtide_pb2.SamplingParams(max_tokens=2))
                served = [m async for m in stub_call(request, metadata=metadata, timeout=10)]
                return err.value, served
        finally:
            await server.stop(0)

    error, served = asyncio.run(go())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse" in error.details()
    assert served and served[-1].finish_reason == "length"


def test_tokenizing_a_huge_text_does_not_hold_the_event_loop():
    """Ordering, not timing: /health answers while a 4 MB text is still being tokenized (the
    encoding runs on a worker thread without the GIL). bench/frontend_health.py measures how
    fast it answers."""
    gw = _gateway()
    text = "hello world tide " * 250_000  # ~4.2 MB

    async def go():
        transport = httpx.ASGITransport(app=create_app(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            encoding = asyncio.create_task(gw.prompts.encode("text", text, cap=False))
            await asyncio.sleep(0)  # the encoding has started on its thread
            health = await client.get("/health")
            answered_while_encoding = not encoding.done()
            ids = await encoding
        return health, answered_while_encoding, ids

    health, answered_while_encoding, ids = asyncio.run(go())
    assert health.status_code == 200
    assert answered_while_encoding, "the event loop waited for the tokenizer"
    assert len(ids) == 750_000
