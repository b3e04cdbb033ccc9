import math

import pytest

from kvtide.workers.sampling_params import SamplingParams

NAN = math.nan
INF = math.inf


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be in [1, 128], got 0"),
        ({"n": 129}, "n must be in [1, 128], got 129"),
        ({"n": 2.0}, "n must be an int, got 2.0"),
        ({"n": True}, "n must be an int, got True"),
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"max_tokens": 16.0}, "max_tokens must be an int, got 16.0"),
        ({"max_tokens": "16"}, "max_tokens must be an int, got '16'"),
        ({"min_tokens": -1}, "min_tokens must be >= 0 and <= max_tokens=16, got -1"),
        ({"min_tokens": 17}, "min_tokens must be >= 0 and <= max_tokens=16, got 17"),
        ({"min_tokens": 1.0}, "min_tokens must be an int, got 1.0"),
        ({"temperature": -0.5}, "temperature must be finite and >= 0, got -0.5"),
        ({"temperature": NAN}, "temperature must be finite and >= 0, got nan"),
        ({"temperature": INF}, "temperature must be finite and >= 0, got inf"),
        ({"temperature": "hot"}, "temperature must be a float, got 'hot'"),
        ({"temperature": False}, "temperature must be a float, got False"),
        ({"top_k": -2}, "top_k must be -1 or >= 0, got -2"),
        ({"top_k": 5.0}, "top_k must be an int, got 5.0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": NAN}, "top_p must be in (0, 1], got nan"),
        ({"min_p": -0.1}, "min_p must be in [0, 1], got -0.1"),
        ({"min_p": 1.1}, "min_p must be in [0, 1], got 1.1"),
        ({"min_p": NAN}, "min_p must be in [0, 1], got nan"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be finite and > 0, got 0.0"),
        ({"repetition_penalty": INF}, "repetition_penalty must be finite and > 0, got inf"),
        ({"presence_penalty": 2.5}, "presence_penalty must be finite and in [-2, 2], got 2.5"),
        ({"presence_penalty": NAN}, "presence_penalty must be finite and in [-2, 2], got nan"),
        ({"frequency_penalty": -3}, "frequency_penalty must be finite and in [-2, 2], got -3"),
        ({"frequency_penalty": -INF}, "frequency_penalty must be finite and in [-2, 2], got -inf"),
        ({"logit_bias": [1, 2]}, "logit_bias must be a dict of token id to bias, got [1, 2]"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias keys must be int token ids >= 0, got -1"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias keys must be int token ids >= 0, got '5'"),
        ({"logit_bias": {5: 101.0}}, "logit_bias values must be finite and in [-100, 100], got 101.0 for token 5"),
        ({"logit_bias": {5: NAN}}, "logit_bias values must be finite and in [-100, 100], got nan for token 5"),
        ({"bad_words_token_ids": [[]]}, "bad_words_token_ids must contain only non-empty sequences, got ()"),
        ({"bad_words_token_ids": [[1, -2]]}, "bad_words_token_ids must contain only int token ids >= 0, got -2"),
        ({"bad_words_token_ids": [1, 2]}, "bad_words_token_ids must be a sequence of token ids, got 1"),
        ({"bad_words_token_ids": [[1.0]]}, "bad_words_token_ids must contain only int token ids >= 0, got 1.0"),
        ({"stop": [""]}, "stop must contain only non-empty strings, got ''"),
        ({"stop": ""}, "stop must contain only non-empty strings, got ''"),
        ({"stop": ["a", 3]}, "stop must contain only non-empty strings, got 3"),
        ({"stop": 3}, "stop must be a sequence of strings, got 3"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must contain only int token ids >= 0, got -1"),
        ({"stop_token_ids": [True]}, "stop_token_ids must contain only int token ids >= 0, got True"),
        ({"stop_token_ids": "12"}, "stop_token_ids must be a sequence of token ids, got '12'"),
        ({"seed": -1}, "seed must be in [0, 2**63), got -1"),
        ({"seed": 2**63}, f"seed must be in [0, 2**63), got {2**63}"),
        ({"seed": 1.0}, "seed must be an int, got 1.0"),
        ({"logprobs": -1}, "logprobs must be in [0, 20], got -1"),
        ({"logprobs": 21}, "logprobs must be in [0, 20], got 21"),
        ({"logprobs": 2.0}, "logprobs must be an int, got 2.0"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool, got 1"),
        ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output must be a bool, got 'yes'"),
        ({"skip_special_tokens": None}, "skip_special_tokens must be a bool, got None"),
    ],
)
def test_rejects_bad_values_with_field_value_and_limit(kwargs, message):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == message


def test_defaults_are_valid_and_unchanged():
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.min_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (
        1, 16, 0, 1.0, 0, 1.0, 0.0,
    )
    assert (p.logit_bias, p.bad_words_token_ids, p.stop, p.stop_token_ids) == ({}, (), (), ())
    assert (p.seed, p.logprobs) == (None, None)
    assert not p.greedy


def test_accepts_boundary_values():
    p = SamplingParams(
        n=128, max_tokens=1, min_tokens=1, temperature=0.0, top_p=1e-9, min_p=1.0,
        repetition_penalty=1e-3, presence_penalty=-2.0, frequency_penalty=2.0,
        logit_bias={0: -100, 7: 100}, seed=2**63 - 1, logprobs=20,
    )  # fmt: skip
    assert p.logprobs == 20 and p.seed == 2**63 - 1


def test_normalises_sequences_numbers_and_top_k():
    bias = {3: 1}
    p = SamplingParams(
        stop="###",
        stop_token_ids=[2, 7],
        bad_words_token_ids=[[1, 2], (5,)],
        logit_bias=bias,
        top_k=-1,
        temperature=1,
        presence_penalty=1,
    )
    assert p.stop == ("###",)
    assert p.stop_token_ids == (2, 7)
    assert p.bad_words_token_ids == ((1, 2), (5,))
    assert p.top_k == 0
    assert p.logit_bias == {3: 1.0} and type(p.logit_bias[3]) is float
    assert type(p.temperature) is float and type(p.presence_penalty) is float
    bias[4] = 2.0
    assert p.logit_bias == {3: 1.0}, "the params keep their own copy of logit_bias"
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [({"temperature": 0.0}, True), ({"top_k": 1}, True), ({"temperature": 0.7, "top_k": 2}, False)],
)
def test_greedy(kwargs, greedy):
    assert SamplingParams(**kwargs).greedy is greedy


def test_check_vocab_accepts_ids_inside_vocab():
    SamplingParams(logit_bias={7: 1.0}, stop_token_ids=[7], bad_words_token_ids=[[0, 7]]).check_vocab(8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"logit_bias": {3: 1.0, 9: 1.0, 8: 2.0}}, "logit_bias contains out-of-vocabulary token ids [8, 9]"),
        ({"stop_token_ids": [1, 8]}, "stop_token_ids contains out-of-vocabulary token ids [8]"),
        ({"bad_words_token_ids": [[1], [2, 12]]}, "bad_words_token_ids contains out-of-vocabulary token ids [12]"),
    ],
)
def test_check_vocab_rejects_out_of_vocab_ids(kwargs, message):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs).check_vocab(8)
    assert str(info.value) == f"{message}; the vocabulary size is 8"
