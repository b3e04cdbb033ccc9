"""Streaming token ids to text: whole characters only, and stop strings never half-shown."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.tokenizer import Tokenizer

_PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens decoded ahead of the output, so the first output token decodes in context."""


@dataclass(frozen=True)
class DetokenizedDelta:
    text: str
    """Text released by this push, never a partial character or a partial stop string."""
    stop_string: str | None = None
    """The stop string that matched; the caller finishes the request and pushes no more."""


class IncrementalDetokenizer:
    """Turns one request's output tokens into text a push at a time.

    Decoding works on a window of recent tokens (vLLM's prefix_offset / read_offset): text
    of ``tokens[prefix_offset:read_offset]`` was released already, and the text that
    ``tokens[prefix_offset:]`` adds past it is new. If that ends in U+FFFD, the last token
    ended inside a UTF-8 sequence and the window waits for more. Each push costs O(new tokens).

    Stop strings are checked here and only here: the engine emits token ids. When one matches
    the caller finishes the choice (``finish_reason="stop"``) and aborts it in the engine.

    NOTE: text that might be the start of a stop string is held back; ``flush`` (or a ``final``
    push) releases it once the request ends for another reason.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
    ):
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty: {stop!r}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = stop
        self._include_stop = include_stop_str_in_output
        self._max_hold = max((len(s) for s in stop), default=1) - 1
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        if self._decode(context).endswith("\ufffd"):
            # A prompt cut inside a character would shift every offset; decode without context.
            context = []
        self._tokens = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._held = ""
        """Decoded text not yet released because it may begin a stop string."""
        self._released: list[str] = []
        self._stopped: str | None = None
        self.num_tokens_pushed = 0
        """Output tokens pushed so far."""
        self.num_tokens_to_stop: int | None = None
        """Output tokens up to and including the one that completed the stop string: what the
        choice keeps (the engine may have run a step or two past it)."""

    @property
    def output_text(self) -> str:
        """All text released so far."""
        return "".join(self._released)

    @property
    def stop_string(self) -> str | None:
        return self._stopped

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_new(self, final: bool) -> str:
        """Text the tokens past ``read_offset`` add; empty while they end mid-character."""
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._tokens[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not final):
            return ""
        # Drop tokens that left the window so the tokens list stays O(window).
        del self._tokens[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._tokens)
        return full_text[len(prefix_text) :]

    @classmethod
    def for_request(
        cls, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> IncrementalDetokenizer:
        """One choice's detokenizer, with the request's stop strings and text options."""
        return cls(
            tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )  # fmt: skip

    def push(self, token_ids: Sequence[int], final: bool = False) -> DetokenizedDelta:
        """The text ``token_ids`` release; ``final`` (the engine finished the choice) releases
        whatever was held back too. A push after a stop string matched releases nothing."""
        if self._stopped is not None:
            return DetokenizedDelta("", self._stopped)
        # One token at a time, so text before a character left incomplete at the end is released.
        new_text = []
        for i, token_id in enumerate(token_ids):
            self._tokens.append(token_id)
            new_text.append(self._decode_new(final=False))
            if self._find_stop(self._held + "".join(new_text)) is not None:
                self.num_tokens_to_stop = self.num_tokens_pushed + i + 1
                break
        self.num_tokens_pushed += len(token_ids)
        delta = self._release("".join(new_text))
        if final and delta.stop_string is None:
            delta = DetokenizedDelta(delta.text + self.flush())
        return delta

    def flush(self) -> str:
        """Release everything held back: the request is finishing for a reason other than stop.

        An output that ends inside a UTF-8 sequence releases U+FFFD for it, as a full decode would.
        """
        if self._stopped is not None:
            return ""
        delta = self._release(self._decode_new(final=True), final=True)
        return delta.text

    def _release(self, new_text: str, final: bool = False) -> DetokenizedDelta:
        text = self._held + new_text
        hit = self._find_stop(text)
        if hit is not None:
            index, stop = hit
            self._stopped = stop
            self._held = ""
            out = text[: index + len(stop)] if self._include_stop else text[:index]
            self._released.append(out)
            return DetokenizedDelta(out, stop)
        hold = 0 if final else self._partial_stop_len(text)
        self._held = text[len(text) - hold :] if hold else ""
        out = text[: len(text) - hold]
        self._released.append(out)
        return DetokenizedDelta(out)

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """The earliest stop string in ``text``; on a tie, the one listed first."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = text.find(stop)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that some stop string starts with."""
        for n in range(min(self._max_hold, len(text)), 0, -1):
            suffix = text[-n:]
            if any(stop.startswith(suffix) for stop in self._stop):
                return n
        return 0
