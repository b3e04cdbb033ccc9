"""Prompt text to token ids at the frontend, off its event loop.

Tokenizing a 4 MB prompt takes seconds; on the event loop it would stall every stream and
``/health`` meanwhile. So encoding runs on a small thread pool (``Tokenizer.encode_capped``
releases the GIL while it works), at most a few at a time, and stops counting one token past
what the model can take. A prompt whose UTF-8 bytes already prove it too long (more than the
longest token's bytes times the context length) is refused without tokenizing at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jinja2 import TemplateError

from kvtide.cluster.frontend.errors import invalid
from kvtide.workers import Tokenizer


_UNCAPPED = 2**31 - 1


def check_text(field: str, value: str) -> None:
    """Text must be valid Unicode: JSON can carry a lone surrogate (``"\\ud800"``) that no
    encoder takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start : exc.end].encode("unicode_escape").decode()
        raise invalid(
            f"{field} contains {bad} at position {exc.start}, a lone surrogate; text must be valid Unicode"
        ) from None


class PromptTokenizer:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, threads: int = 2) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kvtide-tokenize")
        self._slots = asyncio.Semaphore(4 * threads)
        """Encodings queued or running at once; more wait (asynchronously) for a slot."""
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True).values()
        longest = max(len(tokenizer.decode([i], skip_special_tokens=False).encode()) for i in vocab)
        # NOTE: the byte bound holds only when no normalizer rewrites the text first.
        self._max_bytes = None if tokenizer.backend.normalizer is not None else longest * max_model_len

    async def encode(self, field: str, text: str, add_special_tokens: bool = True, cap: bool = True) -> list[int]:
        """Token ids of ``text``, cut at ``max_model_len`` (a prompt that long leaves no room for
        output and is refused by the request check) unless ``cap`` is off (the Tokenize API).
        Raises ``ServingError`` for bad text."""
        check_text(field, text)
        num_bytes = len(text.encode())
        if cap and self._max_bytes is not None and num_bytes > self._max_bytes:
            raise invalid(
                f"{field} is {num_bytes} bytes, more than {self.max_model_len} tokens of this model can hold "
                f"(at most {self._max_bytes} bytes); this model's maximum context length is {self.max_model_len} tokens"
            )
        async with self._slots:
            loop = asyncio.get_running_loop()
            limit = self.max_model_len if cap else _UNCAPPED
            return await loop.run_in_executor(self._pool, self.tokenizer.encode_capped, text, limit, add_special_tokens)

    async def encode_chat(self, field: str, rendered: str, cap: bool = True) -> list[int]:
        """``encode`` for a chat ``render_chat`` rendered: with special tokens or not as
        ``Tokenizer.add_special_tokens_for_chat`` decides (no second BOS)."""
        return await self.encode(field, rendered, self.tokenizer.add_special_tokens_for_chat(rendered), cap)

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The chat through the model's template; raises ``ServingError`` naming the message."""
        if not messages:
            raise invalid("messages must contain at least 1 message, got 0")
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise invalid(f"messages[{i}] must have a string role and content, got {m!r}")
            check_text(f"messages[{i}].role", m["role"])
            check_text(f"messages[{i}].content", m["content"])
        try:
            return self.tokenizer.apply_chat_template([dict(m) for m in messages])
        except (TemplateError, ValueError) as exc:
            raise invalid(f"the chat template rejected the messages: {exc}") from exc

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
