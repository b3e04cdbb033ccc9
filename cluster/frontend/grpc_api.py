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
from typing import Any

import grpc

from kvtide.cluster.frontend.errors import Code, ServingError, invalid
from kvtide.cluster.frontend.gateway import Gateway
from kvtide.cluster.frontend.requests import ChoiceDelta
from kvtide.cluster.frontend.status import cluster_status
from kvtide.proto import kvtide_pb2, kvtide_pb2_grpc

logger = logging.getLogger(__name__)

_GRPC_CODES = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}


class Undecodable:
    """What a request that does not parse becomes (``grpc_server`` deserializes it): the
    handler answers INVALID_ARGUMENT instead of gRPC's UNKNOWN."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def sampling_kwargs(params: kvtide_pb2.SamplingParams) -> dict[str, Any]:
    """The fields a client set, as ``SamplingParams`` keyword arguments: the proto message's
    fields are SamplingParams' own, one for one (tests/unit/test_sampling_fields.py)."""
    out: dict[str, Any] = {}
    for f, value in params.ListFields():
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            out[f.name] = dict(value)
        elif f.is_repeated:
            out[f.name] = tuple(tuple(v.ids) for v in value) if f.message_type is not None else tuple(value)
        else:
            out[f.name] = value
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


async def _abort(context: grpc.aio.ServicerContext, exc: ServingError, gateway: Gateway | None = None) -> None:
    if gateway is not None:
        gateway.metrics.errors.labels(exc.code.value).inc()
    metadata = ()
    if exc.retry_after_s is not None:
        metadata = (("retry-after-ms", str(int(exc.retry_after_s * 1000))),)
    await context.abort(_GRPC_CODES[exc.code], exc.message, trailing_metadata=metadata)


class KvtideServicer(kvtide_pb2_grpc.KvtideServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def Generate(self, request, context):
        try:
            _decoded(request)
            self.gateway.check_model(request.model)
            which = request.WhichOneof("prompt")
            prompt = request.text if which == "text" else list(request.token_ids.ids) if which else ""
            async for msg in self._stream(prompt, request.params, request.request_id):
                yield msg
        except ServingError as exc:
            await _abort(context, exc, self.gateway)

    async def Chat(self, request, context):
        try:
            _decoded(request)
            self.gateway.check_model(request.model)
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            prompt = self.gateway.render_chat(messages)
            async for msg in self._stream(prompt, request.params, request.request_id, chat=True):
                yield msg
        except ServingError as exc:
            await _abort(context, exc, self.gateway)

    async def _stream(self, prompt, params, client_request_id: str, chat: bool = False):
        prepared = await self.gateway.prepare(prompt, sampling_kwargs(params), client_request_id or None, chat)
        request_id = client_request_id or prepared.request_id
        async for d in self.gateway.generate(prepared):
            yield _response(request_id, d)

    async def Tokenize(self, request, context):
        gw = self.gateway
        try:
            _decoded(request)
            gw.check_model(request.model)
            if request.WhichOneof("input") == "chat":
                messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
                ids = await gw.prompts.encode_chat("text", gw.render_chat(messages), cap=False)
            else:
                ids = await gw.prompts.encode("text", request.text, request.add_special_tokens, cap=False)
        except ServingError as exc:
            await _abort(context, exc, self.gateway)
        return kvtide_pb2.TokenizeResponse(token_ids=ids, max_model_len=gw.limits.max_model_len)

    async def ListModels(self, request, context):
        gw = self.gateway
        card = kvtide_pb2.ModelCard(
            id=gw.model_name, max_model_len=gw.limits.max_model_len, num_replicas=len(gw.replicas.handles)
        )
        return kvtide_pb2.ListModelsResponse(models=[card])

    async def ClusterStatus(self, request, context):
        gw = self.gateway
        state = gw.replicas.state
        return cluster_status(
            gw.replicas.routing_status(), state.store_status() if state is not None else None,
            num_queued=gw.admission.num_queued, num_in_flight=gw.admission.num_in_flight, draining=gw.draining,
            health=gw.metrics.replica_health(),
        )  # fmt: skip


def _decoded(request) -> None:
    if isinstance(request, Undecodable):
        raise invalid(f"the request does not parse as its protobuf message: {request.error}")
