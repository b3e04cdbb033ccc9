"""Seeded workloads: what each simulated user sends, as a stream of ``Session``s.

A session is one user's conversation: one turn for the ISL/OSL patterns, the shared-prefix
workload and trace replay, several for multi-turn chats (each turn's prompt then carries the
previous turns and the answers the server actually gave, as a chat client does). The same
seed gives the same sessions in the same order, whatever the load mode or the server.

The *salt* changes only the text: the lengths, patterns, arrival times and prefix structure
come from the seed alone, the words from (seed, salt). A run gives each load point and target
its own salt, so no point finds the prompts of an earlier one in the server's prefix cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kvtide.cluster.bench.corpus import OffsetDraw, TextCorpus


@dataclass(frozen=True)
class Turn:
    """One request's new text: the whole prompt of a single-turn session, or one user message."""

    text: str
    num_tokens: int
    """Tokens of ``text`` under the bench's tokenizer (no special tokens)."""
    osl: int
    """Output tokens asked for (``max_tokens``, and ``min_tokens`` / ``ignore_eos`` where sent)."""
    pattern: str
    """Label the records and the per-pattern plots group by."""


@dataclass(frozen=True)
class Session:
    session_id: int
    turns: tuple[Turn, ...]
    arrival_s: float | None = None
    """Trace replay: when the first turn is sent, from the start of the run; None otherwise."""
    think_time_s: float = 0.0
    """Pause between an answer's end and the next turn."""


class Workload(Protocol):
    def sessions(self, salt: int = 0) -> Iterator[Session]:
        """The sessions in order; the same every call with the same salt. May be endless."""
        ...

    def describe(self) -> str:
        """One line for the report: what the workload is, with its sizes."""
        ...


@dataclass(frozen=True)
class Pattern:
    """One ISL/OSL shape; each request draws its lengths uniformly within ±jitter of these."""

    name: str
    isl: int
    osl: int

    def __post_init__(self) -> None:
        if self.isl < 1 or self.osl < 1:
            raise ValueError(f"pattern {self.name!r} needs isl and osl >= 1, got isl={self.isl}, osl={self.osl}")


def standard_patterns(short_isl: int, long_isl: int, short_osl: int, long_osl: int) -> dict[str, Pattern]:
    """The four ISL/OSL patterns operators benchmark: long in / short out (summaries, RAG, code
    completion), long / long, short / long (generation), short / short (chat replies)."""
    return {
        "long-short": Pattern("long-short", long_isl, short_osl),
        "long-long": Pattern("long-long", long_isl, long_osl),
        "short-long": Pattern("short-long", short_isl, long_osl),
        "short-short": Pattern("short-short", short_isl, short_osl),
    }


def _jittered(rng: np.random.Generator, nominal: int, jitter: float) -> int:
    if jitter == 0:
        return nominal
    return max(1, round(nominal * rng.uniform(1 - jitter, 1 + jitter)))


def _text_rng(seed: int, salt: int) -> np.random.Generator:
    """Separate from the structure's generator, so the salt never changes a length."""
    return np.random.default_rng([seed, 1, salt])


def _check_jitter(jitter: float) -> None:
    if not 0 <= jitter < 1:
        raise ValueError(f"length jitter must be in [0, 1), got {jitter}")


@dataclass(frozen=True)
class PatternMix:
    """Single-turn requests whose pattern is drawn by weight; fresh text for every prompt."""

    corpus: TextCorpus
    mix: tuple[tuple[Pattern, float], ...]
    jitter: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        _check_jitter(self.jitter)
        if not self.mix or any(w <= 0 for _, w in self.mix):
            raise ValueError(f"a pattern mix needs patterns with positive weights, got {self.mix}")

    def sessions(self, salt: int = 0) -> Iterator[Session]:
        rng = np.random.default_rng(self.seed)
        offsets = OffsetDraw(self.corpus.num_units, _text_rng(self.seed, salt))
        weights = np.array([w for _, w in self.mix], dtype=float)
        weights /= weights.sum()
        for i in itertools.count():
            pattern = self.mix[int(rng.choice(len(self.mix), p=weights))][0]
            isl, osl = _jittered(rng, pattern.isl, self.jitter), _jittered(rng, pattern.osl, self.jitter)
            yield Session(i, (Turn(self.corpus.text(offsets(), isl), isl, osl, pattern.name),))

    def describe(self) -> str:
        total = sum(w for _, w in self.mix)
        parts = [f"{p.name} (ISL {p.isl}, OSL {p.osl}: {w / total:.0%} of requests)" for p, w in self.mix]
        return f"ISL/OSL patterns, lengths ±{self.jitter:.0%} uniform: " + ", ".join(parts)


@dataclass(frozen=True)
class SharedPrefix:
    """N system prompts shared by many users: each request is one of the N prefixes (drawn
    uniformly) followed by a fresh question. Requests with the same prefix share its tokens."""

    corpus: TextCorpus
    num_prefixes: int
    prefix_tokens: int
    question_tokens: int
    osl: int
    jitter: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        _check_jitter(self.jitter)
        for name in ("num_prefixes", "prefix_tokens", "question_tokens", "osl"):
            if getattr(self, name) < 1:
                raise ValueError(f"shared-prefix {name} must be >= 1, got {getattr(self, name)}")

    def prefix(self, k: int, salt: int = 0) -> str:
        return self.corpus.text(self.corpus.block_offset(k, self.seed, salt), self.prefix_tokens)

    def sessions(self, salt: int = 0) -> Iterator[Session]:
        rng = np.random.default_rng(self.seed)
        offsets = OffsetDraw(self.corpus.num_units, _text_rng(self.seed, salt))
        prefixes = [self.prefix(k, salt) for k in range(self.num_prefixes)]
        for i in itertools.count():
            k = int(rng.integers(self.num_prefixes))
            q, osl = _jittered(rng, self.question_tokens, self.jitter), _jittered(rng, self.osl, self.jitter)
            text = prefixes[k] + self.corpus.text(offsets(), q)
            yield Session(i, (Turn(text, self.prefix_tokens + q, osl, "shared-prefix"),))

    def describe(self) -> str:
        return (f"shared prefix: {self.num_prefixes} system prompts of {self.prefix_tokens} tokens, each request "
                f"one of them + a fresh question of ~{self.question_tokens} tokens, OSL ~{self.osl}")  # fmt: skip


@dataclass(frozen=True)
class MultiTurn:
    """Chats of ``num_turns`` turns. Each turn sends the whole conversation so far (earlier
    user messages and the server's real answers) plus a fresh user message."""

    corpus: TextCorpus
    num_turns: int
    user_tokens: int
    osl: int
    think_time_s: float = 0.0
    jitter: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        _check_jitter(self.jitter)
        for name in ("num_turns", "user_tokens", "osl"):
            if getattr(self, name) < 1:
                raise ValueError(f"multi-turn {name} must be >= 1, got {getattr(self, name)}")
        if self.think_time_s < 0:
            raise ValueError(f"multi-turn think_time_s must be >= 0, got {self.think_time_s}")

    def sessions(self, salt: int = 0) -> Iterator[Session]:
        rng = np.random.default_rng(self.seed)
        offsets = OffsetDraw(self.corpus.num_units, _text_rng(self.seed, salt))
        for i in itertools.count():
            turns = []
            for t in range(self.num_turns):
                n, osl = _jittered(rng, self.user_tokens, self.jitter), _jittered(rng, self.osl, self.jitter)
                turns.append(Turn(self.corpus.text(offsets(), n), n, osl, f"turn {t + 1}"))
            yield Session(i, tuple(turns), think_time_s=self.think_time_s)

    def describe(self) -> str:
        return (f"multi-turn chats: {self.num_turns} turns, each a ~{self.user_tokens}-token user message after "
                f"the whole conversation so far, OSL ~{self.osl}, think time {self.think_time_s:g} s")  # fmt: skip


def parse_mix(text: str, patterns: dict[str, Pattern]) -> tuple[tuple[Pattern, float], ...]:
    """``"long-short=1,short-long=2"`` (a bare name weighs 1; ``all`` is the four, equally)."""
    if text.strip() == "all":
        return tuple((p, 1.0) for p in patterns.values())
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, weight = item.partition("=")
        if name not in patterns:
            raise ValueError(f"unknown pattern {name!r} in --mix; known: {', '.join(patterns)}")
        try:
            out.append((patterns[name], float(weight) if weight else 1.0))
        except ValueError as exc:
            raise ValueError(f"--mix weight of {name!r} must be a number, got {weight!r}") from exc
    if not out:
        raise ValueError(f"--mix names no pattern: {text!r}")
    return tuple(out)


def max_context(turns: Sequence[Turn], per_turn_overhead: int = 16) -> int:
    """Tokens the last turn of a session can reach: every user message and answer so far."""
    return sum(t.num_tokens + t.osl + per_turn_overhead for t in turns)
