"""A trivial OpenAI-compatible streaming server, to measure the bench client itself.

It streams ``max_tokens`` tokens (the text ``" tok"`` each) of ``/v1/completions`` or
``/v1/chat/completions`` at a fixed interval, on an absolute schedule (token i at
``ttft + i * interval`` after the request arrived), so any gap a client measures beyond the
interval is the client's (or the machine's) own delay. It answers ``/v1/models`` too. Plain
asyncio HTTP/1.1 with keep-alive and chunked SSE: no framework between the socket and the
schedule.

Test hooks, as extra body fields: ``echo_status`` (answer with this HTTP error status) and
``echo_fail_after`` (send an error event after this many tokens).

    python -m kvtide.cluster.bench.echo_server --port 8100 --interval-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from dataclasses import dataclass

_CHAT, _COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@dataclass(frozen=True)
class EchoConfig:
    interval_s: float = 0.02
    """Between consecutive tokens."""
    ttft_s: float | None = None
    """Before the first token; None: one interval."""
    default_tokens: int = 16
    """Tokens when the request sends no max_tokens."""
    prefill_s_per_word: float = 0.0
    """Added to the first token's delay per whitespace-separated word of the prompt: a fake
    prefill cost, so TTFT grows with the input as on a real server."""
    max_model_len: int = 8192

    def __post_init__(self) -> None:
        if min(self.interval_s, self.ttft_s or 0.0, self.prefill_s_per_word) < 0:
            raise ValueError(f"echo delays must be >= 0, got interval_s={self.interval_s}, ttft_s={self.ttft_s}, "
                             f"prefill_s_per_word={self.prefill_s_per_word}")  # fmt: skip


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: dict) -> bytes:
    return _chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


class EchoServer:
    def __init__(self, config: EchoConfig = EchoConfig()) -> None:
        self.config = config
        self._server: asyncio.Server | None = None
        self.num_requests = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; returns the port (``port=0`` picks a free one)."""
        self._server = await asyncio.start_server(self._connection, host, port, backlog=4096)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                await self._handle(method, path, body, writer)
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        if method == "GET" and path == "/v1/models":
            card = {"id": "echo", "object": "model", "max_model_len": self.config.max_model_len}
            return await _json(writer, 200, {"object": "list", "data": [card]})
        if method != "POST" or path not in (_CHAT, _COMPLETIONS):
            return await _json(writer, 404, {"error": {"message": f"no route {method} {path}", "code": 404}})
        self.num_requests += 1
        request = json.loads(body or b"{}")
        if "echo_status" in request:
            status = int(request["echo_status"])
            return await _json(writer, status, {"error": {"message": "echo_status asked for it", "code": status}})
        n = int(request.get("max_tokens") or self.config.default_tokens)
        chat = path == _CHAT
        if not request.get("stream"):
            text = " tok" * n
            choice = {"index": 0, "finish_reason": "length"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            return await _json(writer, 200, {"choices": [choice], "usage": {"completion_tokens": n}})
        prompt = request.get("prompt") or " ".join(str(m.get("content", "")) for m in request.get("messages", ()))
        prefill = self.config.prefill_s_per_word * len(str(prompt).split())
        await self._stream(writer, n, chat, request.get("echo_fail_after"), prefill)

    async def _stream(self, writer: asyncio.StreamWriter, n: int, chat: bool, fail_after: int | None,
                      prefill_s: float) -> None:  # fmt: skip
        loop = asyncio.get_running_loop()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        kind = "chat.completion.chunk" if chat else "text_completion"
        start, c = loop.time(), self.config
        first = (c.interval_s if c.ttft_s is None else c.ttft_s) + prefill_s
        for i in range(n):
            if fail_after is not None and i >= int(fail_after):
                writer.write(_event({"error": {"message": "echo_fail_after asked for it", "code": 500}}))
                break
            delay = start + first + i * c.interval_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            choice = {"index": 0, "finish_reason": "length" if i == n - 1 else None}
            choice.update({"delta": {"content": " tok"}} if chat else {"text": " tok"})
            writer.write(_event({"object": kind, "choices": [choice]}))
            await writer.drain()
        else:
            writer.write(_event({"object": kind, "choices": [], "usage": {"completion_tokens": n}}))
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()


async def _json(writer: asyncio.StreamWriter, status: int, obj: dict) -> None:
    body = json.dumps(obj).encode()
    writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (status, len(body), body))  # fmt: skip
    await writer.drain()


async def _serve(host: str, port: int, config: EchoConfig) -> None:
    server = EchoServer(config)
    port = await server.start(host, port)
    print(f"echo server on http://{host}:{port}/v1 (a token every {config.interval_s * 1000:g} ms)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvtide.cluster.bench.echo_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--interval-ms", type=float, default=20.0)
    p.add_argument("--ttft-ms", type=float, default=None, help="before the first token (default: one interval)")
    p.add_argument("--prefill-ms-per-word", type=float, default=0.0, help="added to TTFT per word of the prompt")
    args = p.parse_args(argv)
    ttft = None if args.ttft_ms is None else args.ttft_ms / 1000
    config = EchoConfig(args.interval_ms / 1000, ttft, prefill_s_per_word=args.prefill_ms_per_word / 1000)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
