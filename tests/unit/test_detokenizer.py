"""Tokenizer wrapper and streaming detokenizer on a tiny byte-level BPE built in code."""

from __future__ import annotations

import dataclasses
import json

import pytest
import tokenizers
from jinja2 import TemplateError
from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers.models import BPE

from kvtide.workers.detokenizer import DetokenizedDelta, IncrementalDetokenizer
from kvtide.workers.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or")]
MERGES += [("l", "d"), ("Ġwor", "ld"), ("Ġ", "a"), ("Ġa", "g"), ("Ġag", "a"), ("i", "n"), ("Ġaga", "in")]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=MERGES))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    path = tmp_path_factory.mktemp("tiny-bpe")
    backend.save(str(path / "tokenizer.json"))
    config = {
        "chat_template": CHAT_TEMPLATE,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return path


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


def stream(tok, ids, **kwargs) -> tuple[list[DetokenizedDelta], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, [1, 5], **kwargs)
    deltas = []
    for i in ids:
        deltas.append(detok.push([i]))
        if deltas[-1].stop_string is not None:
            break
    return deltas, detok


def test_tokenizer_basics(tok):
    ids = tok.encode("hello world")
    assert tok.convert_ids_to_tokens(ids) == ["hello", "Ġworld"]
    assert tok.decode(ids) == "hello world"
    assert tok.encode("<|im_start|>hello<|im_end|>") == [1, ids[0], 2]
    assert tok.decode([1, ids[0], 2]) == "hello"
    assert tok.decode([1, ids[0], 2], skip_special_tokens=False) == "<|im_start|>hello<|im_end|>"
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.eos_token_ids == frozenset({0, 2})
    assert tok.all_special_ids == [0, 1, 2]
    assert tok.vocab_size == 3 + 256 + len(MERGES)


def test_encode_adds_bos_only_when_configured(tok):
    with_bos = Tokenizer(tok.backend, dataclasses.replace(tok.config, add_bos_token=True))
    assert with_bos.encode("hello") == [1, *tok.encode("hello")]
    assert with_bos.encode("hello", add_special_tokens=False) == tok.encode("hello")
    assert with_bos.encode("<|im_start|>hello") == [1, *tok.encode("hello")]
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=False)


def test_streamed_deltas_concatenate_to_full_decode(tok):
    text = "hello world, héllo 😀 wörld again! 中文\n\ttabs  and   spaces"
    ids = tok.encode(text)
    deltas, detok = stream(tok, ids)
    tail = detok.flush()
    assert "".join(d.text for d in deltas) + tail == text == tok.decode(ids)
    assert detok.output_text == text
    assert all("\ufffd" not in d.text for d in deltas)
    assert all(d.stop_string is None for d in deltas)


@pytest.mark.parametrize("char", ["é", "😀", "中"])
def test_multibyte_character_is_released_whole(tok, char):
    ids = tok.encode(f"a{char}b")
    assert len(ids) == 2 + len(char.encode())
    deltas, _ = stream(tok, ids)
    assert [d.text for d in deltas] == ["a", *[""] * (len(ids) - 3), char, "b"]


def test_multi_token_push_and_incomplete_tail_on_flush(tok):
    ids = tok.encode("hi 😀")
    detok = IncrementalDetokenizer(tok, [])
    assert detok.push(ids[:-1]) == DetokenizedDelta("hi ")
    # The request ended inside the emoji: flush shows what a full decode would.
    assert detok.flush() == tok.decode(ids[:-1])[3:]
    assert detok.output_text == tok.decode(ids[:-1])


def test_prompt_ending_inside_a_character(tok):
    ids = tok.encode("x😀b")
    detok = IncrementalDetokenizer(tok, ids[:-2])
    deltas = [detok.push([i]).text for i in ids[-2:]]
    assert "".join(deltas) + detok.flush() == tok.decode(ids[-2:]) == "\ufffdb"


def test_stop_string_inside_one_token(tok):
    ids = tok.encode("hello world again")
    deltas, detok = stream(tok, ids, stop=("wor",))
    assert [d.text for d in deltas] == ["hello", " "]
    assert deltas[-1].stop_string == "wor"
    assert detok.output_text == "hello "


def test_stop_string_split_across_tokens_is_never_streamed(tok):
    ids = tok.encode("abc STOP def")
    deltas, detok = stream(tok, ids, stop=("STOP",))
    assert [d.text for d in deltas] == ["a", "b", "c", " ", "", "", "", ""]
    assert deltas[-1] == DetokenizedDelta("", "STOP")
    assert detok.output_text == "abc "
    # The stop string ends the choice at the token that completed it; what the engine ran past
    # it releases nothing.
    assert detok.num_tokens_to_stop == len(deltas)
    assert detok.push([5]) == DetokenizedDelta("", "STOP") and detok.output_text == "abc "


def test_partial_stop_string_is_released_when_it_does_not_complete(tok):
    ids = tok.encode("xSTOW y")
    deltas, detok = stream(tok, ids, stop=("STOP",))
    assert [d.text for d in deltas] == ["x", "", "", "", "STOW", " ", "y"]
    assert detok.flush() == ""


def test_include_stop_str_in_output(tok):
    ids = tok.encode("abc STOP def")
    deltas, detok = stream(tok, ids, stop=("STOP",), include_stop_str_in_output=True)
    assert deltas[-1] == DetokenizedDelta("STOP", "STOP")
    assert detok.output_text == "abc STOP"


def test_earliest_of_several_stop_strings_wins(tok):
    ids = tok.encode("xx abc def")
    detok = IncrementalDetokenizer(tok, [], stop=("def", "abc"))
    assert detok.push(ids) == DetokenizedDelta("xx ", "abc")
    detok = IncrementalDetokenizer(tok, [], stop=("def", "c d"), include_stop_str_in_output=True)
    assert detok.push(ids) == DetokenizedDelta("xx abc d", "c d")


def test_flush_releases_held_text(tok):
    ids = tok.encode("the EN")
    deltas, detok = stream(tok, ids, stop=("END",))
    assert "".join(d.text for d in deltas) == "the "
    assert detok.flush() == "EN"
    assert detok.output_text == "the EN"


def test_special_tokens_in_stream(tok):
    ids = tok.encode("hello<|im_end|>")
    deltas, _ = stream(tok, ids)
    assert "".join(d.text for d in deltas) == "hello"
    deltas, _ = stream(tok, ids, skip_special_tokens=False, stop=("<|im_end|>",))
    assert deltas[-1] == DetokenizedDelta("", "<|im_end|>")


def test_decode_work_per_push_does_not_grow(tok):
    decoded_lengths = []

    class CountingTokenizer(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):
            decoded_lengths.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    counting = CountingTokenizer(tok.backend, tok.config)
    ids = tok.encode("hello world é " * 200)
    detok = IncrementalDetokenizer(counting, list(range(100)), stop=("zzz",))
    for i in ids:
        detok.push([i])
    assert len(ids) > 1000
    assert max(decoded_lengths) <= 7
    assert detok.output_text + detok.flush() == "hello world é " * 200


def test_empty_stop_string_is_rejected(tok):
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tok, [], stop=("",))


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert tok.apply_chat_template(messages) == expected + "<|im_start|>assistant\n"
    assert tok.encode(tok.apply_chat_template(messages))[0] == tok.bos_token_id
    with pytest.raises(TemplateError, match="unknown role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
