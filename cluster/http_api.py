"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) over the same ``Gateway`` as gRPC.

Request and response shapes follow OpenAI's completions and chat completions (with vLLM's
sampling extensions: top_k, min_p, repetition_penalty, min_tokens, ...), so the official
``openai`` client and the field's benchmark tools work unchanged. Errors use OpenAI's body
(``{"error": {"message", "type", "param", "code"}}``) and the status that mirrors the gRPC
code. A streamed request reports admission and validation errors as a status code: the first
delta is awaited before the 200 and the SSE headers go out.

Cancellation: a streaming response whose client disconnects fails its next write, which
closes the gateway's stream and aborts the request on its replica; a non-streaming request
polls for the disconnect while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from kvtide.cluster.gateway import ChoiceDelta, Code, Gateway, PreparedRequest, ServingError, Usage, api_key_ok

_HTTP_STATUS = {
    Code.INVALID_ARGUMENT: (400, "BadRequestError"),
    Code.NOT_FOUND: (404, "NotFoundError"),
    Code.UNAUTHENTICATED: (401, "AuthenticationError"),
    Code.RESOURCE_EXHAUSTED: (429, "RateLimitError"),
    Code.UNAVAILABLE: (503, "ServiceUnavailableError"),
    Code.DEADLINE_EXCEEDED: (504, "TimeoutError"),
    Code.INTERNAL: (500, "InternalServerError"),
}
_DISCONNECT_POLL_S = 0.25


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingBody(BaseModel):
    """Fields both endpoints share; unknown fields are ignored, as OpenAI's own API does."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None

    def sampling_kwargs(self, logprobs: int | None) -> dict[str, Any]:
        names = (
            "max_tokens", "temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty",
            "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "include_stop_str_in_output",
            "skip_special_tokens",
        )  # fmt: skip
        out = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        if self.stop is not None:
            out["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if self.stop_token_ids:
            out["stop_token_ids"] = tuple(self.stop_token_ids)
        if self.logit_bias:
            try:
                out["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError as exc:
                raise ServingError(Code.INVALID_ARGUMENT, f"logit_bias keys must be token ids: {exc}") from exc
        if logprobs is not None:
            out["logprobs"] = logprobs
        return out


class CompletionBody(_SamplingBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_SamplingBody):
    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def error_response(exc: ServingError) -> JSONResponse:
    status, kind = _HTTP_STATUS[exc.code]
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    body = {"error": {"message": exc.message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Guard:
    """Pure ASGI middleware (no buffering of streamed responses): bearer auth on every path
    but /health, and the body size limit announced by Content-Length."""

    def __init__(self, app, config) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        error = None
        if scope["path"] != "/health" and not api_key_ok(headers.get("authorization"), self.config.api_keys):
            error = error_response(
                ServingError(Code.UNAUTHENTICATED, "missing or invalid API key: send 'Authorization: Bearer <key>'")
            )
        length = headers.get("content-length", "")
        if error is None and length.isdigit() and int(length) > self.config.max_message_bytes:
            error = _too_large(int(length), self.config.max_message_bytes)
        if error is not None:
            return await error(scope, receive, send)
        return await self.app(scope, receive, send)


def _too_large(num_bytes: int, limit: int) -> JSONResponse:
    message = f"the request body is {num_bytes} bytes; the limit is {limit} bytes"
    return JSONResponse({"error": {"message": message, "type": "BadRequestError", "code": 413}}, status_code=413)


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="kvtide", docs_url=None, redoc_url=None, openapi_url=None)
    config = gateway.config

    app.add_middleware(_Guard, config=config)

    @app.exception_handler(ServingError)
    async def on_serving_error(request: Request, exc: ServingError):
        gateway.metrics.rejected.labels(exc.code.value).inc()
        return error_response(exc)

    @app.exception_handler(_BodyTooLarge)
    async def on_too_large(request: Request, exc: _BodyTooLarge):
        return _too_large(exc.num_bytes, exc.limit)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return error_response(ServingError(Code.INVALID_ARGUMENT, _describe(exc.errors())))

    @app.get("/health")
    async def health() -> Response:
        if gateway.draining:
            return PlainTextResponse("draining\n", status_code=503)
        return PlainTextResponse("ok\n")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        spec = gateway.spec
        card = {"id": spec.name, "object": "model", "created": 0, "owned_by": "kvtide",
                "max_model_len": spec.max_model_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = _parse(CompletionBody, await _body(request, config.max_message_bytes))
        gateway.check_model(body.model)
        if body.echo:
            # NOTE: echo's use is scoring prompts (with logprobs), which needs prompt logprobs
            # the engine does not compute; refuse rather than answer without the echo.
            raise ServingError(Code.INVALID_ARGUMENT, "echo=true is not supported (no prompt logprobs); send echo=false")
        prompts = _prompts(body.prompt, config.max_prompts_per_request)
        kwargs = body.sampling_kwargs(body.logprobs)
        defaulted = "max_tokens" not in kwargs
        kwargs.setdefault("max_tokens", 16)  # OpenAI's default for completions
        prepared = []
        for i, p in enumerate(prompts):  # every prompt is checked before any runs
            try:
                prepared.append(gateway.prepare(p, kwargs))
            except ServingError as exc:
                message = exc.message
                if defaulted and message.startswith("max_tokens"):
                    message += " (max_tokens was not sent; /v1/completions defaults it to 16)"
                if len(prompts) > 1:
                    message = f"prompt[{i}]: {message}"
                raise exc.with_message(message) from exc
        stream = _merged(gateway, prepared)
        num_choices = len(prepared) * prepared[0].params.n
        return await _respond(request, gateway, stream, num_choices, body, "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = _parse(ChatBody, await _body(request, config.max_message_bytes))
        gateway.check_model(body.model)
        messages = [{"role": m.role, "content": _content(m.content)} for m in body.messages]
        prompt = gateway.render_chat(messages)
        kwargs = body.sampling_kwargs(body.top_logprobs or 0 if body.logprobs else None)
        renamed = {"logprobs": "top_logprobs"} if body.top_logprobs is not None else {}
        if body.max_completion_tokens is not None:
            kwargs["max_tokens"] = body.max_completion_tokens
            renamed["max_tokens"] = "max_completion_tokens"
        try:
            prepared = gateway.prepare(prompt, kwargs)
        except ServingError as exc:  # name the field the client sent, not the engine's
            message = exc.message
            for engine_name, field_name in renamed.items():
                if message.startswith(engine_name + " "):
                    message = field_name + message[len(engine_name) :]
            raise exc.with_message(message) from exc
        stream = gateway.generate(prepared)
        return await _respond(request, gateway, stream, prepared.params.n, body, "chat.completion", "chatcmpl")

    return app


async def _body(request: Request, limit: int) -> bytes:
    """The body, refused past ``limit`` even when it came chunked without a Content-Length."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise _BodyTooLarge(len(raw), limit)
    return bytes(raw)


class _BodyTooLarge(Exception):
    def __init__(self, num_bytes: int, limit: int) -> None:
        super().__init__(num_bytes, limit)
        self.num_bytes, self.limit = num_bytes, limit


def _parse(model: type[BaseModel], raw: bytes):
    try:
        return model.model_validate(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ServingError(Code.INVALID_ARGUMENT, f"the request body is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        raise ServingError(Code.INVALID_ARGUMENT, _describe(exc.errors())) from exc


def _describe(errors) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in errors)


def _content(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise ServingError(Code.INVALID_ARGUMENT, f"only text content parts are supported, got {part.get('type')!r}")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _prompts(prompt: str | list[int] | list[str] | list[list[int]], limit: int) -> list[str | list[int]]:
    """OpenAI's four prompt shapes as a list of prompts: a string, token ids, or a list of either."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise ServingError(Code.INVALID_ARGUMENT, "prompt must contain at least 1 token, got 0")
    if len(prompt) > limit:
        raise ServingError(
            Code.INVALID_ARGUMENT, f"prompt is a list of {len(prompt)} prompts; the limit is {limit} per request"
        )
    return list(prompt)


async def _merged(gateway: Gateway, prepared: list[PreparedRequest]) -> AsyncIterator[ChoiceDelta]:
    """The prompts of one completions request as one stream of choices, as OpenAI numbers them:
    prompt i's choice j is index ``i * n + j``. Each prompt is its own request (admitted and
    routed on its own, so a batch spreads over replicas); the usage of all of them, summed,
    rides on the last delta. One failing prompt fails the request and aborts the others."""
    if len(prepared) == 1:
        async with contextlib.aclosing(gateway.generate(prepared[0])) as only:
            async for d in only:
                yield d
        return
    n = prepared[0].params.n
    queue: asyncio.Queue[tuple[ChoiceDelta | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, request: PreparedRequest) -> None:
        try:
            async with contextlib.aclosing(gateway.generate(request)) as deltas:
                async for d in deltas:
                    await queue.put((dataclasses.replace(d, index=i * n + d.index), None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            if isinstance(exc, ServingError):
                exc = exc.with_message(f"prompt[{i}]: {exc.message}")
            await queue.put((None, exc))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(prepared)]
    usages: list[Usage] = []
    try:
        while len(usages) < len(prepared):
            delta, error = await queue.get()
            if error is not None:
                raise error
            if delta.usage is not None:
                usages.append(delta.usage)
                total = None
                if len(usages) == len(prepared):  # the last delta of the last prompt
                    total = Usage(
                        sum(u.prompt_tokens for u in usages),
                        sum(u.completion_tokens for u in usages),
                        sum(u.cached_tokens for u in usages),
                    )
                delta = dataclasses.replace(delta, usage=total)
            yield delta
    finally:
        for t in tasks:
            t.cancel()  # closes each prompt's stream, which aborts it on its replica
        await asyncio.gather(*tasks, return_exceptions=True)


async def _respond(request, gateway, stream, num_choices: int, body, kind: str, id_prefix: str) -> Response:
    chat = kind == "chat.completion"
    response_id = f"{id_prefix}-{uuid.uuid4().hex}"
    head = {"id": response_id, "created": int(time.time()), "model": gateway.spec.name}
    if not body.stream:
        deltas = await _unless_disconnected(request, _collect(stream))
        return JSONResponse(_full_response(head, kind, deltas, num_choices, gateway.tokenizer))
    try:
        first = await _unless_disconnected(request, anext(stream))
    except BaseException:
        await stream.aclose()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = _sse(head, kind + ".chunk", first, stream, chat, include_usage, gateway.tokenizer)
    return StreamingResponse(events, media_type="text/event-stream")


async def _collect(stream: AsyncIterator[ChoiceDelta]) -> list[ChoiceDelta]:
    return [d async for d in stream]


async def _unless_disconnected(request: Request, awaitable):
    """Await ``awaitable``; cancel it (which aborts the request) if the client hangs up first."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ServingError(Code.UNAVAILABLE, "the client disconnected")
    finally:
        if not task.done():
            # Wait for the cancel to land: the caller closes the stream next, which fails
            # ("generator already running") while the task is still inside it.
            task.cancel()
            await asyncio.wait({task})


async def _sse(head, kind, first, stream, chat: bool, include_usage: bool, tokenizer) -> AsyncIterator[str]:
    try:
        delta, seen = first, set()
        while delta is not None:
            choice: dict[str, Any] = {"index": delta.index, "logprobs": _logprobs(delta, chat, tokenizer),
                                      "finish_reason": delta.finish_reason}  # fmt: skip
            if chat:
                choice["delta"] = {"content": delta.text}
                if delta.index not in seen:
                    choice["delta"]["role"] = "assistant"
                    seen.add(delta.index)
            else:
                choice["text"] = delta.text
            yield _event({**head, "object": kind, "choices": [choice]})
            if delta.usage is not None and include_usage:
                yield _event({**head, "object": kind, "choices": [], "usage": _usage(delta.usage)})
            delta = await anext(stream, None)
    except ServingError as exc:
        status, error_type = _HTTP_STATUS[exc.code]
        yield _event({"error": {"message": exc.message, "type": error_type, "param": None, "code": status}})
    finally:
        await stream.aclose()
    yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _full_response(head: dict, kind: str, deltas: list[ChoiceDelta], n: int, tokenizer) -> dict:
    chat = kind == "chat.completion"
    texts, finish, logprobs = [""] * n, [None] * n, [[] for _ in range(n)]
    usage = None
    for d in deltas:
        texts[d.index] += d.text
        finish[d.index] = d.finish_reason
        logprobs[d.index].extend(d.logprobs)
        usage = d.usage or usage
    choices = []
    for i in range(n):
        merged = ChoiceDelta(i, (), texts[i], tuple(logprobs[i]), finish[i], None, "")
        choice: dict[str, Any] = {"index": i, "finish_reason": finish[i], "logprobs": _logprobs(merged, chat, tokenizer)}
        if chat:
            choice["message"] = {"role": "assistant", "content": texts[i]}
        else:
            choice["text"] = texts[i]
        choices.append(choice)
    return {**head, "object": kind, "choices": choices, "usage": _usage(usage) if usage else None}


def _usage(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _logprobs(delta: ChoiceDelta, chat: bool, tokenizer) -> dict | None:
    """OpenAI's logprobs shapes; token strings are the vocabulary's pieces."""
    if not delta.logprobs:
        return None

    def tok(token_id: int) -> str:
        return tokenizer.convert_ids_to_tokens([token_id])[0] or ""

    if chat:
        content = [
            {"token": tok(lp.token_id), "logprob": lp.logprob, "bytes": None,
             "top_logprobs": [{"token": tok(t), "logprob": v, "bytes": None} for t, v in lp.top_logprobs]}
            for lp in delta.logprobs
        ]  # fmt: skip
        return {"content": content}
    return {
        "tokens": [tok(lp.token_id) for lp in delta.logprobs],
        "token_logprobs": [lp.logprob for lp in delta.logprobs],
        "top_logprobs": [{tok(t): v for t, v in lp.top_logprobs} for lp in delta.logprobs],
        "text_offset": [],
    }

