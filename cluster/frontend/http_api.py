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

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from kvtide.cluster.frontend.errors import Code, ServingError, invalid
from kvtide.cluster.frontend.gateway import Gateway
from kvtide.cluster.frontend.http_render import error_response, merged, respond
from kvtide.cluster.frontend.http_schema import ChatBody, CompletionBody, describe, parse_body, sampling_kwargs
from kvtide.cluster.frontend.requests import api_key_ok



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
        gateway.metrics.errors.labels(exc.code.value).inc()
        return error_response(exc)

    @app.exception_handler(_BodyTooLarge)
    async def on_too_large(request: Request, exc: _BodyTooLarge):
        gateway.metrics.errors.labels(Code.INVALID_ARGUMENT.value).inc()
        return _too_large(exc.num_bytes, exc.limit)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        gateway.metrics.errors.labels(Code.INVALID_ARGUMENT.value).inc()
        return error_response(invalid(describe(exc.errors())))

    @app.get("/health")
    async def health() -> Response:
        if gateway.draining:
            return PlainTextResponse("draining\n", status_code=503)
        if not gateway.healthy:
            return PlainTextResponse("no replica is healthy\n", status_code=503)
        return PlainTextResponse("ok\n")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": gateway.model_name, "object": "model", "created": 0, "owned_by": "kvtide",
                "max_model_len": gateway.limits.max_model_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_body(CompletionBody, await _body(request, config.max_message_bytes))
        gateway.check_model(body.model)
        if body.echo:
            # NOTE: echo's use is scoring prompts (with logprobs), which needs prompt logprobs
            # the engine does not compute; refuse rather than answer without the echo.
            raise invalid("echo=true is not supported (no prompt logprobs); send echo=false")
        prompts = _prompts(body.prompt, config.max_prompts_per_request)
        kwargs = sampling_kwargs(body, body.logprobs)
        defaulted = "max_tokens" not in kwargs
        kwargs.setdefault("max_tokens", 16)  # OpenAI's default for completions
        prepared = []
        for i, p in enumerate(prompts):  # every prompt is checked before any runs
            try:
                prepared.append(await gateway.prepare(p, kwargs))
            except ServingError as exc:
                message = exc.message
                if defaulted and message.startswith("max_tokens"):
                    message += " (max_tokens was not sent; /v1/completions defaults it to 16)"
                if len(prompts) > 1:
                    message = f"prompt[{i}]: {message}"
                raise exc.with_message(message) from exc
        stream = merged(gateway, prepared)
        num_choices = len(prepared) * prepared[0].request.params.n
        return await respond(request, gateway, stream, num_choices, body, "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = parse_body(ChatBody, await _body(request, config.max_message_bytes))
        gateway.check_model(body.model)
        messages = [{"role": m.role, "content": _content(m.content)} for m in body.messages]
        prompt = gateway.render_chat(messages)
        kwargs = sampling_kwargs(body, body.top_logprobs or 0 if body.logprobs else None)
        renamed = {"logprobs": "top_logprobs"} if body.top_logprobs is not None else {}
        if body.max_completion_tokens is not None:
            kwargs["max_tokens"] = body.max_completion_tokens
            renamed["max_tokens"] = "max_completion_tokens"
        try:
            prepared = await gateway.prepare(prompt, kwargs, chat=True)
        except ServingError as exc:  # name the field the client sent, not the engine's
            message = exc.message
            for engine_name, field_name in renamed.items():
                if message.startswith(engine_name + " "):
                    message = field_name + message[len(engine_name) :]
            raise exc.with_message(message) from exc
        stream = gateway.generate(prepared)
        return await respond(request, gateway, stream, prepared.request.params.n, body, "chat.completion", "chatcmpl")

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


def _content(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise invalid(f"only text content parts are supported, got {part.get('type')!r}")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _prompts(prompt: str | list[int] | list[str] | list[list[int]], limit: int) -> list[str | list[int]]:
    """OpenAI's four prompt shapes as a list of prompts: a string, token ids, or a list of either."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise invalid("prompt must contain at least 1 token, got 0")
    if len(prompt) > limit:
        raise invalid(f"prompt is a list of {len(prompt)} prompts; the limit is {limit} per request")
    return list(prompt)


