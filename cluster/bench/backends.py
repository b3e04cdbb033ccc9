"""The two ways ``kvtide bench`` talks to a server: kvtide's gRPC API and OpenAI's HTTP API.

A backend turns a ``BenchRequest`` into a stream of ``Chunk``s and nothing else: timing is
the load generator's job, so both backends are measured the same way. Failures are raised as
``StreamError`` (code: the gRPC code name, or the HTTP status / the error event's code). The
HTTP backend lives in ``http_backend.py`` (it imports httpx, which gRPC-only runs do not need).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from kvtide.cluster.bench.sse import Chunk, StreamError

OSL_CONTROLS = ("both", "ignore_eos", "min_tokens", "none")


@dataclass(frozen=True)
class TargetConfig:
    """One server under test."""

    backend: str
    """``grpc`` (kvtide's API, ``url`` = host:port) or ``openai`` (``url`` = http://host:port/v1)."""
    url: str
    label: str = ""
    """Name in the records and plots (default: the backend)."""
    model: str = ""
    """Model name sent with each request (gRPC: empty means the served model)."""
    endpoint: str = "completions"
    """``completions`` (the prompt as raw text) or ``chat`` (messages through the chat template)."""
    api_key: str | None = None
    osl_control: str = "both"
    """How OSL is enforced beyond ``max_tokens``: send ``ignore_eos`` and/or ``min_tokens``
    (kvtide and vLLM take both; llama.cpp's server takes ignore_eos), or ``none`` for servers
    that reject unknown fields."""
    temperature: float = 0.0
    request_timeout_s: float = 600.0
    max_connections: int = 1024
    """HTTP connection pool size (one connection per concurrent stream)."""
    extra_body: tuple[tuple[str, object], ...] = field(default=())
    """More JSON fields for every HTTP request body."""

    def __post_init__(self) -> None:
        if self.backend not in ("grpc", "openai"):
            raise ValueError(f"backend must be 'grpc' or 'openai', got {self.backend!r}")
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', got {self.endpoint!r}")
        if self.osl_control not in OSL_CONTROLS:
            raise ValueError(f"osl_control must be one of {', '.join(OSL_CONTROLS)}, got {self.osl_control!r}")
        if self.backend == "openai" and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"an openai target's url must start with http:// or https://, got {self.url!r}")

    @property
    def name(self) -> str:
        return self.label or self.backend


@dataclass(frozen=True)
class BenchRequest:
    request_id: str
    messages: tuple[tuple[str, str], ...]
    """(role, content) pairs; one user message for a single-turn prompt."""
    osl: int


def render_transcript(messages: tuple[tuple[str, str], ...]) -> str:
    """The prompt text for the completions endpoint: a lone user message as is, a conversation
    as ``User:`` / ``Assistant:`` paragraphs ending in an open ``Assistant:`` turn."""
    if len(messages) == 1:
        return messages[0][1]
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(role, role)}:{text}" for role, text in messages) + "\n\nAssistant:"


def osl_fields(target: TargetConfig, osl: int) -> dict[str, object]:
    out: dict[str, object] = {"max_tokens": osl, "temperature": target.temperature}
    if target.osl_control in ("both", "ignore_eos"):
        out["ignore_eos"] = True
    if target.osl_control in ("both", "min_tokens"):
        out["min_tokens"] = osl
    return out


class Backend(Protocol):
    target: TargetConfig

    def stream(self, request: BenchRequest) -> AsyncIterator[Chunk]: ...

    async def max_model_len(self) -> int | None:
        """The server's context length if it says (kvtide and vLLM do), else None."""
        ...

    async def aclose(self) -> None: ...


class GrpcBackend:
    def __init__(self, target: TargetConfig) -> None:
        from kvtide.cluster.client import AsyncKvtideClient

        self.target = target
        self._client = AsyncKvtideClient(target.url, api_key=target.api_key, timeout_s=target.request_timeout_s)

    async def stream(self, request: BenchRequest) -> AsyncIterator[Chunk]:
        import grpc

        t, params = self.target, osl_fields(self.target, request.osl)
        if t.endpoint == "chat":
            messages = [{"role": r, "content": c} for r, c in request.messages]
            call = self._client.chat(messages, model=t.model, request_id=request.request_id, **params)
        else:
            prompt = render_transcript(request.messages)
            call = self._client.generate(prompt, model=t.model, request_id=request.request_id, **params)
        try:
            async for d in call:
                if d.index != 0:
                    continue
                u = d.usage if d.HasField("usage") else None
                yield Chunk(len(d.token_ids), d.text, u and u.prompt_tokens, u and u.completion_tokens,
                            u and u.cached_tokens)  # fmt: skip
        except grpc.aio.AioRpcError as exc:
            raise StreamError(exc.code().name, exc.details() or "") from exc
        finally:
            call.cancel()  # no-op once finished; aborts the request if the consumer stopped early

    async def max_model_len(self) -> int | None:
        models = await self._client.list_models()
        return int(models[0].max_model_len) if models else None

    async def aclose(self) -> None:
        await self._client.close()


def make_backend(target: TargetConfig) -> Backend:
    if target.backend == "grpc":
        return GrpcBackend(target)
    from kvtide.cluster.bench.http_backend import OpenAIBackend

    return OpenAIBackend(target)
