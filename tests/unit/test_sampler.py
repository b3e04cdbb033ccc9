import math
from collections import Counter

import pytest
import torch

from kvtide.workers import sampler as sampler_module
from kvtide.workers.sampler import SampledToken, Sampler, SamplingRow, _process_row
from kvtide.workers.sampling_params import SamplingParams

EOS = 7
# Probabilities of an 8-token vocabulary, largest first; the nucleus / min_p tests depend on them.
PROBS = [0.4, 0.3, 0.2, 0.05, 0.02, 0.02, 0.005, 0.005]
LOGITS = [math.log(p) for p in PROBS]


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kwargs)


def row(params=None, prompt=(), output=(), generator=None, stop=(EOS,)) -> SamplingRow:
    return SamplingRow(params or greedy(), list(prompt), list(output), generator, frozenset(stop))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample(logits, *rows: SamplingRow) -> list[int]:
    return [t.token_id for t in Sampler()(torch.tensor(logits, dtype=torch.float32), rows)]


def draws(logits, params: SamplingParams, num_draws: int = 2000, seed: int = 0) -> Counter:
    """num_draws independent draws from one distribution, as one batch sharing a generator."""
    g = seeded(seed)
    batch = torch.tensor([logits] * num_draws, dtype=torch.float32)
    return Counter(t.token_id for t in Sampler()(batch, [row(params, generator=g)] * num_draws))


def test_greedy_takes_argmax_lowest_id_on_ties():
    out = Sampler()(
        torch.tensor([[0.0, 3.0, 1.0, 0.0], [5.0, 1.0, 2.0, 0.0], [1.0, 4.0, 4.0, 0.0]]),
        [row(), row(SamplingParams(temperature=0.8, top_k=1)), row()],
    )
    assert out == [SampledToken(1, None, ()), SampledToken(0, None, ()), SampledToken(1, None, ())]


def test_logit_bias_flips_the_winner():
    logits = [[0.0, 2.0, 1.5, 0.0]]
    assert sample(logits, row(greedy(logit_bias={2: 0.4}))) == [1]
    assert sample(logits, row(greedy(logit_bias={2: 0.6}))) == [2]
    assert sample(logits, row(greedy(logit_bias={1: -1.9}))) == [2]


def test_min_tokens_bans_stop_ids_then_releases_them():
    logits = [[0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 9.0]]
    params = greedy(min_tokens=2, stop_token_ids=[2])
    stop = (EOS, 2)
    assert sample(logits, row(params, output=[], stop=stop)) == [1]
    assert sample(logits, row(params, output=[5], stop=stop)) == [1]
    assert sample(logits, row(params, output=[5, 5], stop=stop)) == [EOS]
    assert sample(logits, row(greedy(), output=[], stop=stop)) == [EOS]


def test_min_tokens_bans_eos_when_sampling():
    counts = draws([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0], SamplingParams(min_tokens=1))
    assert EOS not in counts and set(counts) == set(range(7))


def test_single_token_bad_word_is_always_banned():
    logits = [[0.0, 3.0, 2.0, 0.0]]
    assert sample(logits, row(greedy(bad_words_token_ids=[[1]]))) == [2]
    assert sample(logits, row(greedy(bad_words_token_ids=[[1], [2]]))) == [0]


@pytest.mark.parametrize(
    ("output", "expected"),
    [([], 1), ([3], 1), ([2], 1), ([2, 3], 2), ([0, 2, 3], 2), ([2, 3, 0], 1), ([3, 2], 1)],
)
def test_multi_token_bad_word_bans_last_token_after_its_prefix(output, expected):
    logits = [[0.0, 3.0, 2.0, 0.0]]
    assert sample(logits, row(greedy(bad_words_token_ids=[[2, 3, 1]]), output=output)) == [expected]


@pytest.mark.parametrize(
    ("logits", "penalty", "expected"),
    [
        ([2.0, 1.5, 0.0], 1.2, 0),  # 2.0 / 1.2 = 1.67 > 1.5
        ([2.0, 1.5, 0.0], 1.4, 1),  # 2.0 / 1.4 = 1.43 < 1.5
        ([-1.0, -1.1, -5.0], 1.05, 0),  # -1.0 * 1.05 = -1.05 > -1.1
        ([-1.0, -1.1, -5.0], 1.2, 1),  # -1.0 * 1.2 = -1.2 < -1.1
        ([1.0, 1.8, 0.0], 0.5, 0),  # a penalty < 1 rewards repeats: 1.0 / 0.5 = 2.0 > 1.8
    ],
)
def test_repetition_penalty_divides_positive_and_multiplies_negative(logits, penalty, expected):
    params = greedy(repetition_penalty=penalty)
    assert sample([logits], row(params, prompt=[0])) == [expected]
    assert sample([logits], row(params, output=[0])) == [expected]
    assert sample([logits], row(params, prompt=[2])) == [logits.index(max(logits))]


@pytest.mark.parametrize(
    ("presence", "frequency", "expected"),
    [
        (0.9, 0.0, 0),  # 3 - 0.9 = 2.1
        (1.1, 0.0, 1),  # 3 - 1.1 = 1.9
        (0.0, 0.45, 0),  # 3 - 2 * 0.45 = 2.1
        (0.0, 0.55, 1),  # 3 - 2 * 0.55 = 1.9
        (0.3, 0.3, 0),  # 3 - 0.6 - 0.3 = 2.1
        (0.3, 0.4, 1),  # 3 - 0.8 - 0.3 = 1.9
        (-1.0, 0.0, 0),
    ],
)
def test_presence_and_frequency_penalties_count_output_tokens(presence, frequency, expected):
    logits = [[3.0, 2.0, 0.0, 0.0]]
    params = greedy(presence_penalty=presence, frequency_penalty=frequency)
    assert sample(logits, row(params, output=[0, 3, 0])) == [expected]
    # Prompt tokens do not count toward either penalty.
    assert sample(logits, row(params, prompt=[0, 0, 0, 0], output=[3])) == [0]


def test_processors_apply_in_order_with_exact_values():
    x = torch.tensor([-0.5, 2.0, 1.0, -1.0, 4.0, 0.0, 0.0, 3.0])
    params = SamplingParams(
        logit_bias={0: 1.0, 3: -0.5},
        min_tokens=5,
        bad_words_token_ids=[[5], [6, 4]],
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
    )
    _process_row(x, row(params, prompt=[0, 3], output=[6, 1, 1, 6], stop=(EOS,)))
    inf = math.inf
    # 0: bias then penalty: (-0.5 + 1) / 2; 3: (-1 - 0.5) * 2; 1: 2 / 2 - 0.5 - 2 * 0.25;
    # 4: banned after 6; 5: always banned; 6: 0 / 2 - 0.5 - 2 * 0.25; 7: EOS under min_tokens.
    assert x.tolist() == [0.25, 0.0, 1.0, -3.0, -inf, -inf, -1.0, -inf]


def test_top_k_never_samples_outside_the_top_k():
    logits = [0.0, 1.0, 2.0, 3.0, 2.5, 0.5, 1.5, 2.2]
    counts = draws(logits, SamplingParams(top_k=2))
    assert set(counts) == {3, 4}
    assert counts[3] / 2000 == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.05)
    assert set(draws(logits, SamplingParams(top_k=3, temperature=5.0))) == {3, 4, 7}


@pytest.mark.parametrize("other", [SamplingParams(top_k=2), SamplingParams(top_k=2, top_p=0.99)])
def test_rows_without_top_k_keep_the_whole_vocabulary_in_a_top_k_batch(other):
    g, num_draws = seeded(0), 1000
    batch = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]] * 2 * num_draws)
    rows = [row(SamplingParams(), generator=g), row(other, generator=g)] * num_draws
    out = [t.token_id for t in Sampler()(batch, rows)]
    assert set(out[0::2]) == set(range(8))
    assert set(out[1::2]) == {6, 7}


@pytest.mark.parametrize("num_candidates", [1024, 2])
@pytest.mark.parametrize(
    ("top_p", "nucleus"),
    [(0.3, {0}), (0.6, {0, 1}), (0.75, {0, 1, 2}), (0.92, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_nucleus_reaching_top_p(top_p, nucleus, num_candidates, monkeypatch):
    # With 2 candidates the larger nuclei take the full-sort fallback.
    monkeypatch.setattr(sampler_module, "TOP_P_CANDIDATES", num_candidates)
    counts = draws(LOGITS, SamplingParams(top_p=top_p))
    assert set(counts) == nucleus
    mass = sum(PROBS[t] for t in nucleus)
    for t in nucleus:
        assert counts[t] / 2000 == pytest.approx(PROBS[t] / mass, abs=0.05)


def test_top_k_and_top_p_together(monkeypatch):
    monkeypatch.setattr(sampler_module, "TOP_P_CANDIDATES", 2)
    assert set(draws(LOGITS, SamplingParams(top_k=3, top_p=0.6))) == {0, 1}
    assert set(draws(LOGITS, SamplingParams(top_k=2, top_p=0.95))) == {0, 1}


def test_top_k_top_p_and_plain_rows_in_one_batch(monkeypatch):
    monkeypatch.setattr(sampler_module, "TOP_P_CANDIDATES", 2)
    g, num_draws = seeded(0), 1000
    params = [SamplingParams(top_p=0.92), SamplingParams(top_k=3), SamplingParams(), SamplingParams(top_p=0.6)]
    rows = [row(p, generator=g) for p in params] * num_draws
    out = [t.token_id for t in Sampler()(torch.tensor([LOGITS] * len(rows)), rows)]
    assert [set(out[j :: len(params)]) for j in range(len(params))] == [
        {0, 1, 2, 3},
        {0, 1, 2},
        set(range(8)),
        {0, 1},
    ]


@pytest.mark.parametrize(("min_p", "kept"), [(0.1, {0, 1, 2, 3}), (0.6, {0, 1}), (0.8, {0})])
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p, kept):
    assert set(draws(LOGITS, SamplingParams(min_p=min_p))) == kept


def test_without_filters_every_token_can_be_sampled():
    assert set(draws([0.0] * 8, SamplingParams())) == set(range(8))


def test_low_temperature_concentrates_on_the_argmax():
    assert set(draws([0.0, 1.0, 0.9, 0.0], SamplingParams(temperature=0.01), num_draws=200)) == {1}


def _generate(seed: int, num_tokens: int = 40) -> list[int]:
    g, params, tokens = seeded(seed), SamplingParams(seed=seed), []
    for _ in range(num_tokens):
        tokens += sample([[0.0] * 8], row(params, output=tokens, generator=g))
    return tokens


def test_same_seed_same_tokens_different_seed_different_tokens():
    assert _generate(1) == _generate(1)
    assert _generate(1) != _generate(2)
    assert len(set(_generate(1))) > 1


def test_seeded_row_does_not_depend_on_its_batch():
    logits = [[0.0] * 8, [0.5] * 8, [1.0, 0.0, 2.0, 0.5, 0.1, 0.3, 0.0, 0.0]]
    alone = sample([logits[0]], row(SamplingParams(seed=5), generator=seeded(5)))
    batched = sample(
        logits,
        row(SamplingParams(seed=5), generator=seeded(5)),
        row(SamplingParams()),
        row(SamplingParams(top_p=0.5)),
    )
    assert batched[0] == alone[0]


def test_logprobs_come_from_raw_logits():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0, 3.0, 0.0, 0.2, 1.5]])
    raw = torch.log_softmax(logits, dim=-1)[0]
    params = greedy(logprobs=3, logit_bias={2: 50.0}, repetition_penalty=1.5)
    [out] = Sampler()(logits, [row(params, prompt=[4])])
    assert out.token_id == 2
    assert out.logprob == pytest.approx(raw[2].item(), abs=1e-6)
    assert [t for t, _ in out.top_logprobs] == [4, 1, 7]
    assert [lp for _, lp in out.top_logprobs] == pytest.approx([raw[4].item(), raw[1].item(), raw[7].item()])

    [out] = Sampler()(logits, [row(SamplingParams(temperature=2.0, logprobs=0), generator=seeded(0))])
    assert out.logprob == pytest.approx(raw[out.token_id].item(), abs=1e-6)
    assert out.top_logprobs == ()


def test_logprobs_per_row_length():
    logits = torch.tensor([LOGITS, LOGITS, LOGITS])
    out = Sampler()(logits, [row(greedy(logprobs=1)), row(), row(greedy(logprobs=5))])
    assert [len(t.top_logprobs) for t in out] == [1, 0, 5]
    assert out[1].logprob is None
    assert [t for t, _ in out[2].top_logprobs] == [0, 1, 2, 3, 4]
    assert [lp for _, lp in out[2].top_logprobs] == pytest.approx([math.log(p) for p in PROBS[:5]], abs=1e-5)


def test_input_logits_are_not_mutated():
    logits = torch.tensor([LOGITS, LOGITS, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    before = logits.clone()
    rows = [
        row(greedy(logit_bias={1: 5.0}, repetition_penalty=1.3, bad_words_token_ids=[[0]]), prompt=[1]),
        row(SamplingParams(temperature=0.5, top_k=3, top_p=0.8, min_p=0.1, presence_penalty=1.0), output=[0]),
        row(SamplingParams(min_tokens=3, logprobs=2), output=[1]),
    ]
    Sampler()(logits, rows)
    assert torch.equal(logits, before)


def test_batch_mixing_greedy_and_sampled_rows():
    logits = [
        [0.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [9.0, 9.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0],
    ]
    rows = [
        row(),
        row(SamplingParams(seed=3), generator=seeded(3)),
        row(greedy(logit_bias={2: 2.5})),
        row(SamplingParams(top_k=2, temperature=0.001)),
        row(SamplingParams(seed=4, top_p=0.5), generator=seeded(4)),
    ]
    out = sample(logits, *rows)
    assert out[0] == 1
    assert out[1] == sample([logits[1]], row(SamplingParams(seed=3), generator=seeded(3)))[0]
    assert out[2] == 2
    assert out[3] == 1
    assert out[4] == 6
