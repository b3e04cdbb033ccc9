"""``kvtide serve``'s API end to end on loopback: a real Ray replica of SmolLM2, real gRPC and
HTTP servers, real Redis; the official ``openai`` client and a raw gRPC stub as clients.

One module-scoped server (one replica, at most 2 sequences in its batch so a third request
waits in the engine) serves every test; the tests that need other frontend limits start a
second gateway in-process over the same replica. Long requests (``LONG``) ban EOS so they
run until cancelled; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvtide.cluster.client import AsyncKvtideClient, KvtideClient
from kvtide.cluster.frontend.gateway import Gateway
from kvtide.cluster.frontend.grpc_server import start_grpc_server
from kvtide.cluster.frontend.http_api import create_app
from kvtide.cluster.frontend.requests import FrontendConfig
from kvtide.cluster.serve import Server, ServeConfig
from kvtide.proto import kvtide_pb2, kvtide_pb2_grpc
from kvtide.workers import EngineConfig, EngineRequest, SamplingParams

pytestmark = pytest.mark.slow

API_KEY = "test-key-123"
MAX_MODEL_LEN = 2048
MAX_MESSAGE_BYTES = 32 * 1024
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG = {"max_tokens": 1800, "min_tokens": 1800, "temperature": 0.0}
"""Runs for a minute or more on CPU: one that is not really cancelled outlives ``IDLE_TIMEOUT_S``."""
IDLE_TIMEOUT_S = 10.0
TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def server(cluster):
    """The composition ``kvtide serve`` runs, on the test's Ray cluster, on its own loop thread."""
    config = ServeConfig(
        grpc_port=0,
        http_port=0,
        engine=EngineConfig.from_kwargs(num_blocks=320, max_model_len=MAX_MODEL_LEN, max_num_seqs=2),
        frontend=FrontendConfig(api_keys=(API_KEY,), max_message_bytes=MAX_MESSAGE_BYTES),
        stats_interval_s=0.2,
    )
    runner = _LoopThread()
    srv = Server(config)
    runner.run(srv.start(), timeout_s=600)
    try:
        yield srv, runner
    finally:
        runner.run(srv.stop(drain_timeout_s=1.0), timeout_s=120)
        runner.close()


class _LoopThread:
    """An event loop on a thread: the server's, while the test drives blocking clients."""

    def __init__(self) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout_s: float = TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


@pytest.fixture(scope="module")
def target(server) -> str:
    return f"127.0.0.1:{server[0].grpc_port}"


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[0].http_port}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def client(target):
    with KvtideClient(target, api_key=API_KEY, timeout_s=TIMEOUT_S) as c:
        yield c


def replica_actor(server):
    (handle,) = server[0].gateway.replicas.handles.values()
    return handle.actor


def replica_stats(server):
    return ray.get(replica_actor(server).stats.remote(), timeout=30)


def wait_for(predicate, what: str, timeout_s: float = 30.0, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def engine_reference(server, prompt: str, max_tokens: int) -> tuple[list[int], str]:
    """The replica's engine on the same text, called directly (token ids in, token ids out),
    and the whole output decoded at once: what the gateway's incremental text must equal."""
    tokenizer = server[0].gateway.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    request = EngineRequest(f"reference-{time.monotonic_ns()}", tuple(tokenizer.encode(prompt)), params)
    refs = replica_actor(server).generate.options(num_returns="streaming").remote(request)
    tokens = [t for ref in refs for t in ray.get(ref, timeout=TIMEOUT_S).token_ids]
    return tokens, tokenizer.decode(tokens)


def chat_prompt(server, messages) -> str:
    return server[0].gateway.tokenizer.apply_chat_template(messages)


def assert_idle(server):
    """No request left running or waiting on the replica, within IDLE_TIMEOUT_S."""

    def idle() -> bool:
        s = replica_stats(server)
        return s.num_running == 0 and s.num_waiting == 0

    wait_for(idle, "an idle replica", timeout_s=IDLE_TIMEOUT_S)


# -- the openai client ----------------------------------------------------------------------


def test_openai_chat_equals_the_engine(server, oai):
    tokens, text = engine_reference(server, chat_prompt(server, QUESTION), max_tokens=12)
    reply = oai.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == text
    assert "Paris" in text
    assert reply.usage.completion_tokens == len(tokens)
    assert reply.usage.prompt_tokens == len(server[0].gateway.tokenizer.encode(chat_prompt(server, QUESTION)))

    stream = oai.chat.completions.create(
        model="smollm2-135m", messages=QUESTION, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason


def test_openai_text_completion_equals_the_engine(server, oai):
    prompt = "The tide comes in and"
    tokens, text = engine_reference(server, prompt, max_tokens=10)
    reply = oai.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=10, temperature=0)
    assert reply.choices[0].text == text
    assert reply.usage.completion_tokens == len(tokens)
    streamed = list(oai.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text
    # OpenAI's streamed completions chunks are "text_completion" (aiperf reads text only from those).
    assert {c.object for c in streamed} == {"text_completion"}
    assert [m.id for m in oai.models.list()] == ["smollm2-135m"]

    # A list of prompts: choice i is prompt i, usage is their sum, streamed or not.
    other = "Once upon a time"
    other_tokens, other_text = engine_reference(server, other, max_tokens=10)
    batch = oai.completions.create(model="smollm2-135m", prompt=[prompt, other], max_tokens=10, temperature=0)
    assert [(c.index, c.text) for c in batch.choices] == [(0, text), (1, other_text)]
    assert batch.usage.completion_tokens == len(tokens) + len(other_tokens)
    streamed = oai.completions.create(
        model="smollm2-135m", prompt=[prompt, other], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    texts, usage = ["", ""], None
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
        usage = chunk.usage or usage
    assert texts == [text, other_text]
    assert usage.completion_tokens == len(tokens) + len(other_tokens)


# -- gRPC -----------------------------------------------------------------------------------


def test_raw_grpc_stub_streams_the_engine_tokens(server, target):
    prompt = "Once upon a time"
    tokens, text = engine_reference(server, prompt, max_tokens=10)
    ids = server[0].gateway.tokenizer.encode(prompt)
    with grpc.insecure_channel(target) as channel:
        stub = kvtide_pb2_grpc.KvtideStub(channel)
        request = kvtide_pb2.GenerateRequest(
            token_ids=kvtide_pb2.TokenIds(ids=ids), params=kvtide_pb2.SamplingParams(max_tokens=10, temperature=0.0)
        )
        deltas = list(stub.Generate(request, metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=TIMEOUT_S))
    assert len(deltas) > 1, "one message per step, not one at the end"
    assert [t for d in deltas for t in d.token_ids] == tokens
    assert "".join(d.text for d in deltas) == text
    assert deltas[-1].finish_reason in ("length", "stop")
    assert deltas[-1].usage.completion_tokens == len(tokens) and deltas[-1].usage.prompt_tokens == len(ids)


def test_python_clients_chat_tokenize_models_status(server, client, target):
    _, text = engine_reference(server, chat_prompt(server, QUESTION), max_tokens=8)
    assert client.chat_complete(QUESTION, max_tokens=8, temperature=0.0).text == text
    assert client.tokenize("hello world") == server[0].gateway.tokenizer.encode("hello world")
    (card,) = client.list_models()
    assert (card.id, card.max_model_len, card.num_replicas) == ("smollm2-135m", MAX_MODEL_LEN, 1)
    status = client.cluster_status()
    assert status.routing_policy == "kv_aware" and [r.replica_id for r in status.replicas] == ["replica-0"]
    # The replica publishes its KV events to the embedded Redis; the router follows them.
    wait_for(lambda: client.cluster_status().routing_mode == "exact", "exact routing from Redis")

    async def via_async() -> str:
        async with AsyncKvtideClient(target, api_key=API_KEY, timeout_s=TIMEOUT_S) as c:
            return (await c.chat_complete(QUESTION, max_tokens=8, temperature=0.0)).text

    assert asyncio.run(via_async()) == text


def test_health_and_reflection_need_no_key(target):
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kvtide.v1.Kvtide"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"kvtide.v1.Kvtide", "grpc.health.v1.Health"} <= names


def test_cli_generate_talks_to_the_server(target):
    exe = Path(sys.executable).with_name("kvtide")
    out = subprocess.run(
        [str(exe), "generate", "--server", target, "--api-key", API_KEY, "What is the capital of France?",
         "--max-tokens", "12"],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


# -- rejections: the right code, a message naming the problem, and the server keeps serving --


def test_unauthenticated_requests_are_refused(server, target):
    with grpc.insecure_channel(target) as channel:
        stub = kvtide_pb2_grpc.KvtideStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(kvtide_pb2.GenerateRequest(text="hi"), metadata=metadata, timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                stub.ListModels(kvtide_pb2.ListModelsRequest(), metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    base = f"http://127.0.0.1:{server[0].http_port}"
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(f"{base}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize(
    ("params", "code", "status", "needle"),
    [
        ({"temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, 400, "temperature must be finite and >= 0, got -1.0"),
        ({"top_p": 0.0}, grpc.StatusCode.INVALID_ARGUMENT, 400, "top_p must be in (0, 1], got 0.0"),
        ({"max_tokens": 5000}, grpc.StatusCode.INVALID_ARGUMENT, 400, "max_tokens is too large: 5000"),
        ({"model": "gpt-9"}, grpc.StatusCode.NOT_FOUND, 404, "'gpt-9' does not exist"),
        ({"prompt": "tide " * 2100}, grpc.StatusCode.INVALID_ARGUMENT, 400, "maximum context length is 2048"),
    ],
)
def test_bad_requests_get_the_right_code_and_the_server_keeps_serving(server, client, oai, params, code, status, needle):
    params = dict(params)
    prompt, model = params.pop("prompt", "Hello"), params.pop("model", "")
    with pytest.raises(grpc.RpcError) as err:
        client.complete(prompt, model=model, **params)
    assert err.value.code() == code and needle in err.value.details()
    with pytest.raises(openai.APIStatusError) as http_err:
        oai.completions.create(model=model or "smollm2-135m", prompt=prompt, **params)
    assert http_err.value.status_code == status and needle in http_err.value.message
    assert client.complete("Hello", max_tokens=2).finish_reason in ("length", "stop")


def test_oversize_messages_are_refused(server, client, oai):
    huge = "x" * (MAX_MESSAGE_BYTES + 1)
    with pytest.raises(grpc.RpcError) as err:
        client.complete(huge, max_tokens=1)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in err.value.details()
    with pytest.raises(openai.APIStatusError) as http_err:
        oai.completions.create(model="smollm2-135m", prompt=huge, max_tokens=1)
    assert http_err.value.status_code == 413 and f"the limit is {MAX_MESSAGE_BYTES} bytes" in http_err.value.message
    assert client.complete("Hello", max_tokens=2).finish_reason in ("length", "stop")


def test_garbage_bytes_on_the_grpc_port_do_not_hurt(server, client):
    for garbage in (b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 8, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff" * 50):
        with socket.create_connection(("127.0.0.1", server[0].grpc_port), timeout=5) as s:
            s.sendall(garbage)
            s.settimeout(5)
            try:
                s.recv(4096)  # the server answers with an error frame or closes; never hangs
            except (TimeoutError, ConnectionResetError):
                pass
    assert client.complete("Hello", max_tokens=2).finish_reason in ("length", "stop")


# -- cancellation ---------------------------------------------------------------------------


def test_grpc_cancel_mid_stream_frees_blocks(server, client):
    assert_idle(server)
    free_before = replica_stats(server).num_free_blocks
    stream = client.generate("Tell me a very long story about the sea.", **LONG)
    for _ in range(3):
        next(stream)
    assert replica_stats(server).num_running == 1
    stream.cancel()
    assert_idle(server)
    assert replica_stats(server).num_free_blocks == free_before


def test_grpc_deadline_aborts_the_request(server, client):
    assert_idle(server)
    with pytest.raises(grpc.RpcError) as err:
        list(client.generate("Tell me a very long story about the tide.", timeout_s=2.0, **LONG))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_idle(server)


def test_http_disconnect_mid_stream_frees_blocks(server):
    assert_idle(server)
    free_before = replica_stats(server).num_free_blocks
    body = {"model": "smollm2-135m", "prompt": "A long story about waves:", "stream": True, **LONG}
    url = f"http://127.0.0.1:{server[0].http_port}/v1/completions"
    with httpx.stream("POST", url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        events = r.iter_lines()
        assert sum(1 for line, _ in zip(events, range(6), strict=False) if line.startswith("data:")) >= 3
        assert replica_stats(server).num_running == 1
    assert_idle(server)
    assert replica_stats(server).num_free_blocks == free_before


def test_request_queued_in_the_engine_then_cancelled_never_runs(server, client):
    """max_num_seqs=2: two long requests fill the batch, a third waits in the engine."""
    assert_idle(server)
    queried_before = replica_stats(server).prefix_cache_queried_tokens
    tokenizer = server[0].gateway.tokenizer
    prompts = ["First long story:", "Second long story:", "The third one, which must never run:"]
    running = [client.generate(p, **LONG) for p in prompts[:2]]
    for stream in running:
        next(stream)
    queued = client.generate(prompts[2], **LONG)
    wait_for(lambda: replica_stats(server).num_waiting == 1, "the third request to wait in the engine")
    queued.cancel()
    wait_for(lambda: replica_stats(server).num_waiting == 0, "the queued request to leave the engine")
    for stream in running:
        stream.cancel()
    assert_idle(server)
    ran = replica_stats(server).prefix_cache_queried_tokens - queried_before
    assert ran == sum(len(tokenizer.encode(p)) for p in prompts[:2]), "the cancelled request was scheduled"


# -- a second frontend over the same replica: admission and drain ----------------------------


def test_full_admission_queue_and_drain(server, client):
    srv, runner = server
    assert_idle(server)
    config = FrontendConfig(max_in_flight=1, max_queued=0, retry_after_s=2.0)
    gateway = Gateway(srv.gateway.model_name, srv.gateway.limits, srv.gateway.tokenizer, srv.gateway.replicas, config)
    second = runner.run(start_grpc_server(gateway, port=0))
    try:
        with KvtideClient(f"127.0.0.1:{second.port}", timeout_s=TIMEOUT_S) as other:
            first = other.generate("A long story:", **LONG)
            next(first)
            with pytest.raises(grpc.RpcError) as err:
                other.complete("Hello", max_tokens=2)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "admission queue is full" in err.value.details()
            assert dict(err.value.trailing_metadata())["retry-after-ms"] == "2000"

            runner.run(second.set_serving(False))
            aborted = runner.run(gateway.drain(timeout_s=0.5))
            assert aborted == 1
            with pytest.raises(grpc.RpcError) as err:
                list(first)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "drain timeout" in err.value.details()
            health = health_pb2_grpc.HealthStub(other.channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service="kvtide.v1.Kvtide"), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                other.complete("Hello", max_tokens=2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
    finally:
        runner.run(second.stop(0))
    assert_idle(server)
    assert client.complete("Hello", max_tokens=2).finish_reason in ("length", "stop")


def test_server_request_timeout_aborts_over_grpc_and_http(server):
    """A frontend with ``request_timeout_s``: a request that outlives it gets DEADLINE_EXCEEDED
    over gRPC and 504 over HTTP (which has no deadline of its own), and leaves the replica idle."""
    srv, runner = server
    assert_idle(server)
    config = FrontendConfig(request_timeout_s=2.0)
    gateway = Gateway(srv.gateway.model_name, srv.gateway.limits, srv.gateway.tokenizer, srv.gateway.replicas, config)
    second = runner.run(start_grpc_server(gateway, port=0))
    try:
        with KvtideClient(f"127.0.0.1:{second.port}", timeout_s=TIMEOUT_S) as other:
            with pytest.raises(grpc.RpcError) as err:
                list(other.generate("A long story:", **LONG))
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "request_timeout_s=2" in err.value.details()
        assert_idle(server)

        async def over_http() -> httpx.Response:
            transport = httpx.ASGITransport(app=create_app(gateway))
            async with httpx.AsyncClient(transport=transport, base_url="http://in-process") as c:
                return await c.post("/v1/completions", json={"prompt": "A long story:", **LONG}, timeout=60)

        r = runner.run(over_http())
        assert r.status_code == 504 and "request_timeout_s=2" in r.json()["error"]["message"]
        assert_idle(server)
    finally:
        runner.run(second.stop(0))


def test_metrics_show_the_engine_and_the_routing_mode(server, oai):
    oai.completions.create(model="smollm2-135m", prompt="Hello", max_tokens=2, temperature=0)
    base = f"http://127.0.0.1:{server[0].http_port}"
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for name in ("kvtide:time_to_first_token_seconds_count", "kvtide:e2e_request_latency_seconds_count",
                 "kvtide:kv_cache_usage_perc", "kvtide:num_requests_running", "kvtide:prefix_cache_queries_total",
                 "kvtide:num_prefill_tokens_pending"):
        assert name in text, name
    # The replica publishes its KV events through Redis, so the router follows it exactly.
    assert 'kvtide:router_exact_mode{replica="replica-0"} 1.0' in text
