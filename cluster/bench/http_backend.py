"""The OpenAI HTTP backend: streaming ``/completions`` or ``/chat/completions`` over httpx,
with the SSE parsed here (``sse.py``) so every server is read the same way.

Connections come from a few ``httpx.AsyncClient`` pools of at most ``POOL_SIZE`` connections
each, shared by all requests, each request taking the least busy pool. NOTE: one pool of 500
would be simpler, but httpcore 1.0's pool rescans every connection on each request start and
end, and for each idle one counts the idle ones again (quadratic): at 500 streams that cost
~60 s of CPU per 1,000 requests and starved the event loop (TTFT measured in tens of seconds
against a server answering in 50 ms). Pools of 32 keep each scan short.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from kvtide.cluster.bench.backends import BenchRequest, TargetConfig, osl_fields, render_transcript
from kvtide.cluster.bench.sse import Chunk, SSEParser, StreamError, openai_chunk

POOL_SIZE = 32


class _Pools:
    """Lazily created clients; ``in_flight[i]`` counts the streams using client i."""

    def __init__(self, target: TargetConfig) -> None:
        self._target = target
        headers = {"Accept-Encoding": "identity"}
        if target.api_key:
            headers["Authorization"] = f"Bearer {target.api_key}"
        self._headers = headers
        self._max_pools = max(1, -(-target.max_connections // POOL_SIZE))
        self.clients: list[httpx.AsyncClient] = []
        self.in_flight: list[int] = []

    def _new(self) -> httpx.AsyncClient:
        t = self._target
        size = min(POOL_SIZE, t.max_connections)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        timeout = httpx.Timeout(t.request_timeout_s, connect=30.0)
        # NOTE: verify=False for plain http only: it skips loading the CA bundle (~30 ms a pool).
        verify = t.url.startswith("https://")
        return httpx.AsyncClient(base_url=t.url.rstrip("/"), headers=self._headers, limits=limits, timeout=timeout,
                                 verify=verify)  # fmt: skip

    def acquire(self) -> int:
        """The index of a pool with a free connection, else of the least busy one."""
        i = next((i for i, n in enumerate(self.in_flight) if n < POOL_SIZE), None)
        if i is None and len(self.clients) < self._max_pools:
            self.clients.append(self._new())
            self.in_flight.append(0)
            i = len(self.clients) - 1
        elif i is None:
            i = min(range(len(self.in_flight)), key=self.in_flight.__getitem__)
        self.in_flight[i] += 1
        return i

    def release(self, i: int) -> None:
        self.in_flight[i] -= 1

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()


class OpenAIBackend:
    def __init__(self, target: TargetConfig) -> None:
        self.target = target
        self._pools = _Pools(target)

    def _body(self, request: BenchRequest) -> tuple[str, dict]:
        t = self.target
        body: dict = {"model": t.model, "stream": True, "stream_options": {"include_usage": True}}
        body.update(osl_fields(t, request.osl))
        body.update(dict(t.extra_body))
        if t.endpoint == "chat":
            body["messages"] = [{"role": r, "content": c} for r, c in request.messages]
            return "/chat/completions", body
        body["prompt"] = render_transcript(request.messages)
        return "/completions", body

    async def stream(self, request: BenchRequest) -> AsyncIterator[Chunk]:
        path, body = self._body(request)
        pool = self._pools.acquire()
        try:
            async with self._pools.clients[pool].stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    raise StreamError(str(response.status_code), _error_message(await response.aread()))
                parser, done = SSEParser(), False
                # NOTE: read to the end of the body even after [DONE]: a response left unread
                # makes httpx close its connection, and every request would pay a new one.
                async for raw in response.aiter_raw():
                    for event in () if done else parser.feed(raw):
                        chunk = openai_chunk(event)
                        done = chunk.done
                        if done:
                            break
                        yield chunk
        except httpx.TimeoutException as exc:
            raise StreamError("timeout", f"no answer within {self.target.request_timeout_s:g} s: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise StreamError("http_error", repr(exc)) from exc
        finally:
            self._pools.release(pool)

    async def max_model_len(self) -> int | None:
        pool = self._pools.acquire()
        try:
            reply = await self._pools.clients[pool].get("/models")
            cards = reply.json().get("data") or []
            value = cards[0].get("max_model_len") if cards else None
            return int(value) if value else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        finally:
            self._pools.release(pool)

    async def aclose(self) -> None:
        await self._pools.aclose()


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw).get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        return str(err)
    except (ValueError, AttributeError):
        return raw[:500].decode("utf-8", "replace")
