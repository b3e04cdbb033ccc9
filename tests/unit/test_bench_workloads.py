"""kvtide bench workloads: prompts of exact token counts from real prose, seeded, with shared
prefixes that really share their tokens.

The tokenizer is a byte-level BPE trained here on the bench corpus, with the GPT-2
pre-tokenizer regex SmolLM2, Llama 3 and Qwen2 use: the property the corpus relies on (no token
spans two space-led words) belongs to that pre-tokenizer, not to one vocabulary. The live bench
test checks the same counts against the real model's tokenizer, through the server's usage."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from kvtide.cluster.bench.corpus import OffsetDraw, TextCorpus, default_corpus_files, load_corpus
from kvtide.cluster.bench.workloads import (
    MultiTurn,
    PatternMix,
    SharedPrefix,
    max_context,
    parse_mix,
    standard_patterns,
)
from kvtide.workers.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    backend = tokenizers.Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         special_tokens=["<|endoftext|>"], show_progress=False)  # fmt: skip
    backend.train_from_iterator([f.read_text() for f in default_corpus_files()], trainer)
    path = tmp_path_factory.mktemp("bench-bpe")
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return Tokenizer.from_dir(path)


@pytest.fixture(scope="module")
def corpus(tok) -> TextCorpus:
    return load_corpus(tok)


def _count(tok: Tokenizer, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def test_corpus_has_multi_token_units_so_exactness_is_not_trivial(corpus):
    assert corpus.num_units > 2500
    assert max(corpus.unit_tokens) >= 3 and 1 in corpus.unit_tokens


@pytest.mark.parametrize("num_tokens", [1, 2, 7, 64, 513, 4000, 9000])
def test_text_has_the_asked_token_count_anywhere_in_the_ring(tok, corpus, num_tokens):
    """9000 tokens wraps the ~4k-token ring twice."""
    for offset in (0, 1, 977, corpus.num_units - 1):
        text = corpus.text(offset, num_tokens)
        assert abs(_count(tok, text) - num_tokens) <= 1, (offset, num_tokens)
        assert text.startswith(" ") and "  " not in text


def test_text_of_zero_tokens_is_empty_and_negative_is_refused(corpus):
    assert corpus.text(5, 0) == ""
    with pytest.raises(ValueError, match="num_tokens must be >= 0, got -1"):
        corpus.text(5, -1)


def test_pattern_mix_lengths_match_the_tokenizer_and_stay_in_the_jitter(tok, corpus):
    patterns = standard_patterns(short_isl=100, long_isl=1000, short_osl=10, long_osl=200)
    mix = PatternMix(corpus, parse_mix("all", patterns), jitter=0.2, seed=3)
    sessions = list(itertools.islice(mix.sessions(), 40))
    seen = set()
    for s in sessions:
        (turn,) = s.turns
        p = patterns[turn.pattern]
        seen.add(turn.pattern)
        assert abs(_count(tok, turn.text) - turn.num_tokens) <= 1
        assert 0.8 * p.isl - 1 <= turn.num_tokens <= 1.2 * p.isl + 1
        assert 0.8 * p.osl - 1 <= turn.osl <= 1.2 * p.osl + 1
    assert seen == set(patterns)


def test_same_seed_same_sessions_other_seed_other_sessions(corpus):
    patterns = standard_patterns(64, 512, 8, 64)

    def first(seed: int):
        return list(itertools.islice(PatternMix(corpus, parse_mix("all", patterns), seed=seed).sessions(), 12))

    assert first(7) == first(7)
    assert [s.turns for s in first(7)] != [s.turns for s in first(8)]


def test_salt_changes_the_words_and_nothing_else(corpus):
    """Each load point gets its own salt: none finds an earlier point's prompts in the cache."""
    patterns = standard_patterns(64, 512, 8, 64)
    mix = PatternMix(corpus, parse_mix("all", patterns), seed=4)
    a, b = (list(itertools.islice(mix.sessions(salt), 20)) for salt in (0, 1))
    assert [(t.num_tokens, t.osl, t.pattern) for s in a for t in s.turns] == [
        (t.num_tokens, t.osl, t.pattern) for s in b for t in s.turns
    ]
    assert all(x.turns[0].text[:40] != y.turns[0].text[:40] for x, y in zip(a, b, strict=True))
    shared = SharedPrefix(corpus, num_prefixes=2, prefix_tokens=50, question_tokens=10, osl=4, seed=4)
    assert shared.prefix(0, salt=0) != shared.prefix(0, salt=1)
    assert all(s.turns[0].text.startswith((shared.prefix(0, 1), shared.prefix(1, 1)))
               for s in itertools.islice(shared.sessions(salt=1), 10))  # fmt: skip


def test_mix_weights_set_pattern_frequencies(corpus):
    patterns = standard_patterns(16, 32, 4, 8)
    mix = PatternMix(corpus, parse_mix("short-short=3,long-long=1", patterns), seed=0)
    names = [s.turns[0].pattern for s in itertools.islice(mix.sessions(), 2000)]
    assert set(names) == {"short-short", "long-long"}
    assert 0.70 < names.count("short-short") / len(names) < 0.80


def test_fresh_prompts_never_start_at_the_same_word_until_the_ring_is_used_up(corpus):
    draw = OffsetDraw(corpus.num_units, np.random.default_rng(0))
    starts = [draw() for _ in range(corpus.num_units)]
    assert sorted(starts) == list(range(corpus.num_units))


def test_parse_mix_names_the_unknown_pattern():
    patterns = standard_patterns(16, 32, 4, 8)
    with pytest.raises(ValueError, match="unknown pattern 'medium' in --mix; known: long-short"):
        parse_mix("medium=1", patterns)
    with pytest.raises(ValueError, match="weight of 'long-short' must be a number, got 'x'"):
        parse_mix("long-short=x", patterns)


def test_shared_prefix_requests_share_the_prefix_tokens_exactly(tok, corpus):
    w = SharedPrefix(corpus, num_prefixes=3, prefix_tokens=200, question_tokens=40, osl=16, seed=5)
    sessions = list(itertools.islice(w.sessions(), 30))
    prefixes = [w.prefix(k) for k in range(3)]
    assert len(set(prefixes)) == 3
    by_prefix: dict[int, list[list[int]]] = {}
    for s in sessions:
        (turn,) = s.turns
        ids = tok.encode(turn.text, add_special_tokens=False)
        assert abs(len(ids) - turn.num_tokens) <= 1
        (k,) = [k for k, p in enumerate(prefixes) if turn.text.startswith(p)]
        by_prefix.setdefault(k, []).append(ids)
    assert len(by_prefix) == 3
    for group in by_prefix.values():
        assert len(group) >= 2
        assert all(ids[:200] == group[0][:200] for ids in group)  # the same 200 tokens
        assert len({tuple(ids[200:]) for ids in group}) == len(group)  # different questions
    first = [ids[:200] for ids in (g[0] for g in by_prefix.values())]
    assert first[0] != first[1] != first[2]


def test_prefix_blocks_with_the_same_ids_share_their_tokens(tok, corpus):
    a = corpus.blocks_text([4, 9, 11], 32, 80, seed=1)
    b = corpus.blocks_text([4, 9, 12], 32, 90, seed=1)
    c = corpus.blocks_text([4, 10], 32, 50, seed=1)
    ia, ib, ic = (tok.encode(t, add_special_tokens=False) for t in (a, b, c))
    assert (len(ia), len(ib), len(ic)) == (80, 90, 50)
    assert ia[:64] == ib[:64] and ia[64:] != ib[64:80]
    assert ia[:32] == ic[:32] and ia[32:50] != ic[32:50]
    with pytest.raises(ValueError, match="3 prefix blocks of 32 tokens cannot make a prompt of 64 tokens"):
        corpus.blocks_text([1, 2, 3], 32, 64, seed=1)


def test_multi_turn_sessions_have_their_turns_and_fit_the_context_check(corpus):
    w = MultiTurn(corpus, num_turns=4, user_tokens=50, osl=20, think_time_s=0.5, seed=2)
    s = next(w.sessions())
    assert [t.pattern for t in s.turns] == ["turn 1", "turn 2", "turn 3", "turn 4"]
    assert s.think_time_s == 0.5 and len({t.text for t in s.turns}) == 4
    assert max_context(s.turns) == sum(t.num_tokens + t.osl + 16 for t in s.turns)


def test_bad_workload_values_name_the_field():
    corpus = TextCorpus((" a", " b"), (1, 1))
    with pytest.raises(ValueError, match="shared-prefix num_prefixes must be >= 1, got 0"):
        SharedPrefix(corpus, 0, 10, 10, 10)
    with pytest.raises(ValueError, match=r"length jitter must be in \[0, 1\), got 1.5"):
        MultiTurn(corpus, 2, 10, 10, jitter=1.5)
    with pytest.raises(ValueError, match="some unit exactly 1 token"):
        TextCorpus((" aa",), (2,))
