"""The gRPC frontend: ``kvtide.v1.Kvtide`` over the ``Gateway``, plus health and reflection.

The servicer only translates: proto in, ``Gateway`` call, proto out, ``ServingError`` to a
status code. Auth is an interceptor in front of every method but health and reflection,
comparing the bearer token in constant time. Cancellation needs nothing here: grpc aio
cancels the handler's task when the client cancels or the deadline passes
(``context.cancelled()`` stays False), the cancellation closes the gateway's stream, and
that aborts the request on its replica.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvtide.cluster.gateway import ChoiceDelta, Code, Gateway, ServingError, api_key_ok
from kvtide.proto import kvtide_pb2, kvtide_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = kvtide_pb2.DESCRIPTOR.services_by_name["Kvtide"].full_name
_GRPC_CODES = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}
_OPTIONAL_PARAMS = (
    "n", "max_tokens", "min_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "include_stop_str_in_output", "ignore_eos", "seed",
    "logprobs", "skip_special_tokens",
)  # fmt: skip


def sampling_kwargs(params: kvtide_pb2.SamplingParams) -> dict[str, Any]:
    """The fields a client set, as ``SamplingParams`` keyword arguments."""
    out: dict[str, Any] = {name: getattr(params, name) for name in _OPTIONAL_PARAMS if params.HasField(name)}
    if params.stop:
        out["stop"] = tuple(params.stop)
    if params.stop_token_ids:
        out["stop_token_ids"] = tuple(params.stop_token_ids)
    if params.logit_bias:
        out["logit_bias"] = dict(params.logit_bias)
    return out


def _response(request_id: str, d: ChoiceDelta) -> kvtide_pb2.GenerateResponse:
    msg = kvtide_pb2.GenerateResponse(
        request_id=request_id, index=d.index, token_ids=d.token_ids, text=d.text,
        finish_reason=d.finish_reason or "", replica_id=d.replica_id,
    )  # fmt: skip
    for lp in d.logprobs:
        msg.logprobs.add(
            token_id=lp.token_id,
            logprob=lp.logprob if lp.logprob is not None else 0.0,
            top_token_ids=[t for t, _ in lp.top_logprobs],
            top_logprobs=[v for _, v in lp.top_logprobs],
        )
    if isinstance(d.stop_reason, str):
        msg.stop_string = d.stop_reason
    elif isinstance(d.stop_reason, int):
        msg.stop_token_id = d.stop_reason
    if d.usage is not None:
        msg.usage.CopyFrom(kvtide_pb2.Usage(**vars(d.usage)))
    return msg


async def _abort(context: grpc.aio.ServicerContext, exc: ServingError) -> None:
    metadata = ()
    if exc.retry_after_s is not None:
        metadata = (("retry-after-ms", str(int(exc.retry_after_s * 1000))),)
    await context.abort(_GRPC_CODES[exc.code], exc.message, trailing_metadata=metadata)


class KvtideServicer(kvtide_pb2_grpc.KvtideServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def Generate(self, request, context):
        try:
            self.gateway.check_model(request.model)
            which = request.WhichOneof("prompt")
            prompt = request.text if which == "text" else list(request.token_ids.ids) if which else ""
            async for msg in self._stream(prompt, request.params, request.request_id):
                yield msg
        except ServingError as exc:
            await _abort(context, exc)

    async def Chat(self, request, context):
        try:
            self.gateway.check_model(request.model)
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            prompt = self.gateway.render_chat(messages)
            async for msg in self._stream(prompt, request.params, request.request_id):
                yield msg
        except ServingError as exc:
            await _abort(context, exc)

    async def _stream(self, prompt, params, client_request_id: str):
        prepared = self.gateway.prepare(prompt, sampling_kwargs(params), client_request_id or None)
        request_id = client_request_id or prepared.request_id
        async for d in self.gateway.generate(prepared):
            yield _response(request_id, d)

    async def Tokenize(self, request, context):
        gw = self.gateway
        try:
            gw.check_model(request.model)
            if request.WhichOneof("input") == "chat":
                messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
                text, special = gw.render_chat(messages), True
            else:
                text, special = request.text, request.add_special_tokens
        except ServingError as exc:
            await _abort(context, exc)
        ids = gw.tokenizer.encode(text, add_special_tokens=special)
        return kvtide_pb2.TokenizeResponse(token_ids=ids, max_model_len=gw.spec.max_model_len)

    async def ListModels(self, request, context):
        spec = self.gateway.spec
        card = kvtide_pb2.ModelCard(
            id=spec.name, max_model_len=spec.max_model_len, num_replicas=len(self.gateway.replicas.actors)
        )
        return kvtide_pb2.ListModelsResponse(models=[card])

    async def ClusterStatus(self, request, context):
        gw = self.gateway
        routing = gw.replicas.routing_status()
        reply = kvtide_pb2.ClusterStatusResponse(
            routing_policy=str(routing.get("policy", "")), routing_mode=_overall_mode(routing),
            num_queued=gw.num_queued, num_in_flight=gw.num_in_flight, draining=gw.draining,
        )  # fmt: skip
        for rid, s in sorted(gw.replicas.stats.items()):
            reply.replicas.add(
                replica_id=rid, num_running=s.num_running, num_waiting=s.num_waiting,
                num_free_blocks=s.num_free_blocks, kv_cache_usage=s.kv_cache_usage,
                num_preemptions=s.num_preemptions, prefix_cache_queried_tokens=s.prefix_cache_queried_tokens,
                prefix_cache_hit_tokens=s.prefix_cache_hit_tokens,
            )  # fmt: skip
        return reply


def _overall_mode(routing: dict) -> str:
    """"exact" or "approximate" when every replica agrees, else "mixed"; "" without a router."""
    modes = {r.get("mode", "") for r in routing.get("replicas", {}).values()}
    return modes.pop() if len(modes) == 1 else "mixed" if modes else ""


class _AuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every method but health and reflection unless the ``authorization``
    metadata carries a configured bearer token."""

    _EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, api_keys: Sequence[str]) -> None:
        self._keys = tuple(api_keys)

    async def intercept_service(self, continuation, details):
        if not self._keys or details.method.startswith(self._EXEMPT):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        if api_key_ok(metadata.get("authorization"), self._keys):
            return await continuation(details)
        handler = await continuation(details)
        return _denying(handler, "missing or invalid API key: send metadata 'authorization: Bearer <key>'")


def _denying(handler, message: str):
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:
        return None
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny)
    return grpc.stream_stream_rpc_method_handler(deny)


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None = None) -> None:
        await self.server.stop(grace_s)


async def start_grpc_server(
    gateway: Gateway,
    host: str = "127.0.0.1",
    port: int = 0,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
) -> GrpcServer:
    """Start serving; ``port=0`` picks a free port (see ``GrpcServer.port``)."""
    max_bytes = gateway.config.max_message_bytes
    server = grpc.aio.server(
        interceptors=[_AuthInterceptor(gateway.config.api_keys)],
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    kvtide_pb2_grpc.add_KvtideServicer_to_server(KvtideServicer(gateway), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    if tls_cert is not None:
        creds = grpc.ssl_server_credentials([(tls_key, tls_cert)])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    out = GrpcServer(server, health_servicer, bound)
    await out.set_serving(True)
    return out
