"""The gRPC server: ``kvtide.v1.Kvtide`` (``grpc_api.KvtideServicer``), health and reflection.

Auth is an interceptor in front of every method but health and reflection, comparing the
bearer token in constant time. The service's handlers are registered here rather than by the
generated ``add_KvtideServicer_to_server`` so that a request that does not parse reaches the
servicer (as ``Undecodable``) and gets INVALID_ARGUMENT, as the proto promises, instead of
gRPC's UNKNOWN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvtide.cluster.frontend.gateway import Gateway
from kvtide.cluster.frontend.grpc_api import KvtideServicer, Undecodable
from kvtide.cluster.frontend.requests import api_key_ok
from kvtide.proto import kvtide_pb2

SERVICE = kvtide_pb2.DESCRIPTOR.services_by_name["Kvtide"]
SERVICE_NAME = SERVICE.full_name


def _decoder(message_class):
    def decode(raw: bytes):
        try:
            return message_class.FromString(raw)
        except DecodeError as exc:
            return Undecodable(exc)

    return decode


def _handlers(servicer: KvtideServicer) -> dict[str, grpc.RpcMethodHandler]:
    out = {}
    for method in SERVICE.methods:
        request = getattr(kvtide_pb2, method.input_type.name)
        response = getattr(kvtide_pb2, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        out[method.name] = make(
            getattr(servicer, method.name), request_deserializer=_decoder(request),
            response_serializer=response.SerializeToString,
        )  # fmt: skip
    return out


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
    handlers = _handlers(KvtideServicer(gateway))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
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
