"""Real prose cut to an exact number of tokens, so a prompt's length is what the workload asked.

The corpus (``bench/data/alice_ch1.txt`` and ``tests/data/prose.txt`` by default) is flattened
to one line of words joined by single spaces and split into *units*: one word with the space
before it (``" rabbit-hole,"``). NOTE: with a byte-level BPE whose pre-tokenizer splits before
every space that precedes a non-space (GPT-2's regex: SmolLM2, Llama 3, Qwen2), no token ever
spans two units, so the tokens of a concatenation are the concatenation of the units' tokens:
a text built from units whose token counts sum to N is exactly N tokens long. The unit tests
check this against the real tokenizer.

Text is taken from the corpus as a ring of units: ``text(offset, num_tokens)`` starts at unit
``offset`` and wraps around. Where the next unit would overshoot the target it is skipped for
a shorter one (most words are one token), so the count comes out exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def default_corpus_files() -> tuple[Path, ...]:
    """The two public-domain texts in the repository (this file is cluster/bench/corpus.py)."""
    root = Path(__file__).resolve().parents[2]
    return (root / "bench" / "data" / "alice_ch1.txt", root / "tests" / "data" / "prose.txt")


@dataclass(frozen=True)
class TextCorpus:
    """Units of prose and their token counts under one tokenizer.

    Invariant: ``len(units) == len(unit_tokens)``, every count >= 1, and at least one unit
    is a single token (so every target length is reachable).
    """

    units: tuple[str, ...]
    unit_tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.units) != len(self.unit_tokens) or not self.units:
            raise ValueError(f"corpus needs units with token counts, got {len(self.units)} units, "
                             f"{len(self.unit_tokens)} counts")  # fmt: skip
        if min(self.unit_tokens) < 1 or 1 not in self.unit_tokens:
            raise ValueError("every corpus unit must be >= 1 token and some unit exactly 1 token")

    @classmethod
    def build(cls, texts: Sequence[str], count_tokens: Callable[[list[str]], list[int]]) -> TextCorpus:
        """``count_tokens`` maps a batch of unit strings to their token counts (no special tokens)."""
        words = " ".join(texts).split()
        if not words:
            raise ValueError("the corpus is empty")
        units = tuple(" " + w for w in words)
        return cls(units, tuple(count_tokens(list(units))))

    @classmethod
    def from_files(cls, files: Sequence[Path], tokenizer) -> TextCorpus:
        """``tokenizer`` is a ``kvtide.workers.tokenizer.Tokenizer`` (its ``backend`` batches)."""
        texts = [Path(f).read_text(encoding="utf-8") for f in files]

        def count(units: list[str]) -> list[int]:
            return [len(e.ids) for e in tokenizer.backend.encode_batch(units, add_special_tokens=False)]

        return cls.build(texts, count)

    @property
    def num_units(self) -> int:
        return len(self.units)

    def text(self, offset: int, num_tokens: int) -> str:
        """Exactly ``num_tokens`` tokens of prose starting at unit ``offset`` (mod the ring)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        pieces, left, i = [], num_tokens, offset % self.num_units
        while left > 0:
            n = self.unit_tokens[i]
            if n <= left:
                pieces.append(self.units[i])
                left -= n
            i = (i + 1) % self.num_units
        return "".join(pieces)

    def block_offset(self, block_id: int, seed: int, salt: int = 0) -> int:
        """Where prefix block ``block_id``'s text starts: a pure function of (seed, salt, id), so
        the same id gives the same text in every request with that seed and salt."""
        digest = hashlib.sha256(f"{seed}:{salt}:{block_id}".encode()).digest()
        return int.from_bytes(digest[:8], "little") % self.num_units

    def blocks_text(self, block_ids: Sequence[int], block_tokens: int, num_tokens: int, seed: int,
                    salt: int = 0) -> str:  # fmt: skip
        """A prompt of ``num_tokens`` made of prefix blocks: block j holds ``block_tokens``
        tokens of block ``block_ids[j]``'s text, the last one only what is left.

        Two prompts whose first k ids agree share their first ``k * block_tokens`` tokens.
        Requires ``(len(block_ids) - 1) * block_tokens < num_tokens <= len(block_ids) * block_tokens``.
        """
        k = len(block_ids)
        if not (k - 1) * block_tokens < num_tokens <= k * block_tokens:
            raise ValueError(f"{k} prefix blocks of {block_tokens} tokens cannot make a prompt of "
                             f"{num_tokens} tokens: it needs more than {(k - 1) * block_tokens} and at most "
                             f"{k * block_tokens}")  # fmt: skip
        parts = []
        for j, block in enumerate(block_ids):
            size = min(block_tokens, num_tokens - j * block_tokens)
            parts.append(self.text(self.block_offset(block, seed, salt), size))
        return "".join(parts)


class OffsetDraw:
    """Start offsets for fresh (unshared) text: a seeded permutation of the units, so no two of
    the first ``num_units`` prompts start at the same word and share a cacheable prefix by chance."""

    def __init__(self, num_units: int, rng: np.random.Generator) -> None:
        self._num_units = num_units
        self._rng = rng
        self._order: list[int] = []

    def __call__(self) -> int:
        if not self._order:
            self._order = self._rng.permutation(self._num_units).tolist()[::-1]
        return self._order.pop()


def load_corpus(tokenizer, files: Sequence[Path] | None = None) -> TextCorpus:
    return TextCorpus.from_files(tuple(files) if files else default_corpus_files(), tokenizer)
