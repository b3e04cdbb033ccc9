"""Python clients of the kvtide gRPC API: ``KvtideClient`` (blocking) and ``AsyncKvtideClient``.

Sampling options are keyword arguments named as in ``SamplingParams`` (``max_tokens=32,
temperature=0.0, stop=["\\n"]``); unset ones take the server's defaults. Streams yield
``kvtide_pb2.GenerateResponse`` messages; ``complete`` / ``chat_complete`` gather one into a
``Completion``. Errors are ``grpc.RpcError`` with the server's code and message.

    with KvtideClient("127.0.0.1:50051", api_key="...") as client:
        for delta in client.generate("The tide", max_tokens=16, temperature=0):
            print(delta.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Self

import grpc

from kvtide.proto import kvtide_pb2, kvtide_pb2_grpc

Messages = Iterable[Mapping[str, str]]
"""Chat messages: ``[{"role": "user", "content": "..."}]``."""


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: kvtide_pb2.Usage


def _generate_request(prompt: str | Iterable[int], model: str, request_id: str, params) -> kvtide_pb2.GenerateRequest:
    request = kvtide_pb2.GenerateRequest(model=model, request_id=request_id, params=kvtide_pb2.SamplingParams(**params))
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def _chat_request(messages: Messages, model: str, request_id: str, params) -> kvtide_pb2.ChatRequest:
    return kvtide_pb2.ChatRequest(
        model=model,
        request_id=request_id,
        messages=[kvtide_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        params=kvtide_pb2.SamplingParams(**params),
    )


def _gather(deltas: Iterable[kvtide_pb2.GenerateResponse]) -> Completion:
    """Choice 0 of a stream (use the stream itself for n > 1)."""
    text, ids, finish, usage = [], [], "", kvtide_pb2.Usage()
    for d in deltas:
        if d.index == 0:
            text.append(d.text)
            ids.extend(d.token_ids)
            finish = d.finish_reason or finish
        if d.HasField("usage"):
            usage = d.usage
    return Completion("".join(text), tuple(ids), finish, usage)


def _channel_args(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


class _Base:
    """The channel, stub and call options both clients share; ``_channels`` is ``grpc`` or
    ``grpc.aio``. ``root_certificates`` (PEM bytes) switches to TLS."""

    _channels: Any

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        *,
        root_certificates: bytes | None = None,
        timeout_s: float | None = None,
        max_message_bytes: int = 4 * 2**20,
    ) -> None:
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._timeout_s = timeout_s
        options = _channel_args(max_message_bytes)
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates)
            self.channel = self._channels.secure_channel(target, creds, options=options)
        else:
            self.channel = self._channels.insecure_channel(target, options=options)
        self.stub = kvtide_pb2_grpc.KvtideStub(self.channel)

    def _call_options(self, timeout_s: float | None) -> dict[str, Any]:
        return {"metadata": self._metadata, "timeout": timeout_s if timeout_s is not None else self._timeout_s}


class KvtideClient(_Base):
    """Blocking client. ``root_certificates`` (PEM bytes) switches to TLS."""

    _channels = grpc

    def generate(
        self, prompt: str | Iterable[int], *, model: str = "", request_id: str = "",
        timeout_s: float | None = None, **params: Any,
    ) -> Iterator[kvtide_pb2.GenerateResponse]:  # fmt: skip
        """Stream a completion; cancel by calling ``.cancel()`` on the returned iterator."""
        request = _generate_request(prompt, model, request_id, params)
        return self.stub.Generate(request, **self._call_options(timeout_s))

    def chat(
        self, messages: Messages, *, model: str = "", request_id: str = "",
        timeout_s: float | None = None, **params: Any,
    ) -> Iterator[kvtide_pb2.GenerateResponse]:  # fmt: skip
        return self.stub.Chat(_chat_request(messages, model, request_id, params), **self._call_options(timeout_s))

    def complete(self, prompt: str | Iterable[int], **kwargs: Any) -> Completion:
        return _gather(self.generate(prompt, **kwargs))

    def chat_complete(self, messages: Messages, **kwargs: Any) -> Completion:
        return _gather(self.chat(messages, **kwargs))

    def tokenize(self, text: str, *, add_special_tokens: bool = True, model: str = "") -> list[int]:
        request = kvtide_pb2.TokenizeRequest(model=model, text=text, add_special_tokens=add_special_tokens)
        return list(self.stub.Tokenize(request, **self._call_options(None)).token_ids)

    def list_models(self) -> list[kvtide_pb2.ModelCard]:
        return list(self.stub.ListModels(kvtide_pb2.ListModelsRequest(), **self._call_options(None)).models)

    def cluster_status(self) -> kvtide_pb2.ClusterStatusResponse:
        return self.stub.ClusterStatus(kvtide_pb2.ClusterStatusRequest(), **self._call_options(None))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncKvtideClient(_Base):
    """asyncio client; cancelling the task that iterates a stream cancels the request."""

    _channels = grpc.aio

    def generate(
        self, prompt: str | Iterable[int], *, model: str = "", request_id: str = "",
        timeout_s: float | None = None, **params: Any,
    ) -> AsyncIterator[kvtide_pb2.GenerateResponse]:  # fmt: skip
        request = _generate_request(prompt, model, request_id, params)
        return self.stub.Generate(request, **self._call_options(timeout_s))

    def chat(
        self, messages: Messages, *, model: str = "", request_id: str = "",
        timeout_s: float | None = None, **params: Any,
    ) -> AsyncIterator[kvtide_pb2.GenerateResponse]:  # fmt: skip
        return self.stub.Chat(_chat_request(messages, model, request_id, params), **self._call_options(timeout_s))

    async def complete(self, prompt: str | Iterable[int], **kwargs: Any) -> Completion:
        return _gather([d async for d in self.generate(prompt, **kwargs)])

    async def chat_complete(self, messages: Messages, **kwargs: Any) -> Completion:
        return _gather([d async for d in self.chat(messages, **kwargs)])

    async def tokenize(self, text: str, *, add_special_tokens: bool = True, model: str = "") -> list[int]:
        request = kvtide_pb2.TokenizeRequest(model=model, text=text, add_special_tokens=add_special_tokens)
        return list((await self.stub.Tokenize(request, **self._call_options(None))).token_ids)

    async def list_models(self) -> list[kvtide_pb2.ModelCard]:
        reply = await self.stub.ListModels(kvtide_pb2.ListModelsRequest(), **self._call_options(None))
        return list(reply.models)

    async def cluster_status(self) -> kvtide_pb2.ClusterStatusResponse:
        return await self.stub.ClusterStatus(kvtide_pb2.ClusterStatusRequest(), **self._call_options(None))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
