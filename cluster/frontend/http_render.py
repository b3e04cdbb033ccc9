"""Responses of the OpenAI-compatible HTTP API: JSON bodies, server-sent events, OpenAI's
error body and logprobs shapes, and the merge of a batched completions request's prompts."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvtide.cluster.frontend.errors import Code, ServingError
from kvtide.cluster.frontend.gateway import Gateway
from kvtide.cluster.frontend.requests import ChoiceDelta, PreparedRequest, Usage

HTTP_STATUS = {
    Code.INVALID_ARGUMENT: (400, "BadRequestError"),
    Code.NOT_FOUND: (404, "NotFoundError"),
    Code.UNAUTHENTICATED: (401, "AuthenticationError"),
    Code.RESOURCE_EXHAUSTED: (429, "RateLimitError"),
    Code.UNAVAILABLE: (503, "ServiceUnavailableError"),
    Code.DEADLINE_EXCEEDED: (504, "TimeoutError"),
    Code.INTERNAL: (500, "InternalServerError"),
}
_DISCONNECT_POLL_S = 0.25


def error_response(exc: ServingError) -> JSONResponse:
    status, kind = HTTP_STATUS[exc.code]
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    body = {"error": {"message": exc.message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


async def merged(gateway: Gateway, prepared: list[PreparedRequest]) -> AsyncIterator[ChoiceDelta]:
    """The prompts of one completions request as one stream of choices, as OpenAI numbers them:
    prompt i's choice j is index ``i * n + j``. Each prompt is its own request (admitted and
    routed on its own, so a batch spreads over replicas); the usage of all of them, summed,
    rides on the last delta. One failing prompt fails the request and aborts the others.

    NOTE: once every prompt's usage came, no pump is cancelled: each is at the end of its
    stream and ends on its own (its request counted with its finish reason, as the one-prompt
    path waits for its stream's end too); cancelling one still closing would count it aborted.
    Before that, closing the merged stream cancels every pump, aborting each prompt."""
    if len(prepared) == 1:
        async with contextlib.aclosing(gateway.generate(prepared[0])) as only:
            async for d in only:
                yield d
        return
    n = prepared[0].request.params.n
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
        if len(usages) < len(prepared):
            for t in tasks:
                t.cancel()  # closes each prompt's stream, which aborts it on its replica
        await asyncio.gather(*tasks, return_exceptions=True)


async def respond(request, gateway, stream, num_choices: int, body, kind: str, id_prefix: str) -> Response:
    chat = kind == "chat.completion"
    response_id = f"{id_prefix}-{uuid.uuid4().hex}"
    head = {"id": response_id, "created": int(time.time()), "model": gateway.model_name}
    if not body.stream:
        deltas = await _unless_disconnected(request, _collect(stream))
        return JSONResponse(_full_response(head, kind, deltas, num_choices, gateway.tokenizer))
    try:
        first = await _unless_disconnected(request, anext(stream))
    except BaseException:
        await stream.aclose()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # OpenAI names a streamed chat chunk "chat.completion.chunk" but a completions chunk
    # "text_completion", as its full response (aiperf reads completions text only from that).
    events = _sse(head, "chat.completion.chunk" if chat else kind, first, stream, chat, include_usage, gateway)
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


async def _sse(head, kind, first, stream, chat: bool, include_usage: bool, gateway: Gateway) -> AsyncIterator[str]:
    tokenizer = gateway.tokenizer
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
        gateway.metrics.errors.labels(exc.code.value).inc()
        status, error_type = HTTP_STATUS[exc.code]
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

