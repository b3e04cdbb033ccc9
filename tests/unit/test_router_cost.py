"""cost(), the softmin choice and the output-length estimate, with exact expectations."""

from __future__ import annotations

import math
import random

import pytest

from kvtide.router import (
    CostInputs,
    CostWeights,
    OutputLengthEstimator,
    cost,
    softmin_choice,
)


def inputs(**kw) -> CostInputs:
    base = {
        "num_prompt_tokens": 100,
        "num_cached_tokens": 32,
        "num_expected_output_tokens": 20,
        "block_size": 16,
        "num_running": 2,
        "num_waiting": 1,
        "num_free_blocks": 3,
        "num_empty_blocks": 1,
        "queued_prefill_tokens": 200.0,
    }
    return CostInputs(**{**base, **kw})


def test_cost_adds_prefill_queue_decode_kv_overflow_and_eviction():
    x = inputs()
    assert x.num_new_prefill_tokens == 68
    assert x.num_blocks_needed == 8 - 2  # ceil(120 / 16) blocks, 2 of them cached
    assert x.num_missing_blocks == 3
    assert x.num_evicted_blocks == 2  # takes the 3 free blocks; only 1 of them is empty
    # 68 prefill + 0.25 * 200 queued + 8 * 2 running + 4 * 16 * 3 missing + 0.5 * 16 * 2 evicted
    assert cost(x) == 68 + 50 + 16 + 192 + 16


def test_cost_without_kv_pressure_and_with_custom_weights():
    x = inputs(num_free_blocks=100, num_empty_blocks=100, num_waiting=0, queued_prefill_tokens=0)
    assert (x.num_missing_blocks, x.num_evicted_blocks) == (0, 0)
    assert cost(x) == 68 + 16
    w = CostWeights(prefill_weight=2.0, decode_weight=0.0, queue_weight=0.0, overflow_weight=0.0, eviction_weight=0.0)
    assert cost(x, w) == 136


def test_evicting_cached_prefixes_costs_only_beyond_the_empty_blocks():
    x = inputs(num_free_blocks=100, num_empty_blocks=4, num_waiting=0, queued_prefill_tokens=0)
    assert x.num_evicted_blocks == 6 - 4
    assert cost(x) == 68 + 16 + 0.5 * 16 * 2


def test_a_cached_prefix_is_cheaper_than_a_busier_cold_replica():
    kw = {"num_prompt_tokens": 512, "num_waiting": 0, "queued_prefill_tokens": 0, "num_free_blocks": 100, "num_empty_blocks": 100}
    warm = inputs(num_cached_tokens=496, num_running=4, **kw)
    cold = inputs(num_cached_tokens=0, num_running=0, **kw)
    assert cost(warm) == 16 + 32
    assert cost(cold) == 512


@pytest.mark.parametrize("name", ["prefill_weight", "queue_weight", "decode_weight", "overflow_weight", "eviction_weight"])
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_weights_must_be_finite_and_non_negative(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0, got {value}"):
        CostWeights(**{name: value})


def test_softmin_at_temperature_zero_is_argmin_with_random_ties():
    rng = random.Random(0)
    assert {softmin_choice([5.0, 1.0, 3.0], 0.0, rng) for _ in range(50)} == {1}
    picks = [softmin_choice([2.0, 7.0, 2.0], 0.0, rng) for _ in range(400)]
    assert set(picks) == {0, 2}
    assert 150 < picks.count(0) < 250


def test_softmin_shares_equal_replicas_and_avoids_expensive_ones():
    rng = random.Random(1)
    picks = [softmin_choice([1000.0, 1000.0], 0.1, rng) for _ in range(1000)]
    assert 430 < picks.count(0) < 570
    # 1900 above the minimum at a mean of 1050: e^-18 relative weight.
    assert all(softmin_choice([100.0, 2000.0], 0.1, rng) == 0 for _ in range(1000))
    # 1% apart: close to even.
    picks = [softmin_choice([1000.0, 1010.0], 0.1, rng) for _ in range(2000)]
    assert 900 < picks.count(0) < 1200


def test_softmin_is_reproducible_with_a_seed():
    a = [softmin_choice([1.0, 1.1, 1.2], 1.0, random.Random(7)) for _ in range(20)]
    b = [softmin_choice([1.0, 1.1, 1.2], 1.0, random.Random(7)) for _ in range(20)]
    assert a == b


def test_output_length_uses_max_tokens_until_enough_samples_then_a_quantile():
    est = OutputLengthEstimator(window=10, quantile=0.9, min_samples=5)
    for n in (10, 20, 30, 40):
        est.observe(n)
    assert est.expected(256) == 256
    est.observe(50)
    # sorted [10, 20, 30, 40, 50]: index int(0.9 * 5) = 4
    assert est.expected(256) == 50
    assert est.expected(25) == 25
    for n in range(100, 110):  # the window forgets the first five
        est.observe(n)
    assert est.num_samples == 10
    assert est.observed_quantile() == 109


def test_output_length_estimator_rejects_bad_settings():
    with pytest.raises(ValueError, match="quantile must be in"):
        OutputLengthEstimator(quantile=1.5)
    with pytest.raises(ValueError, match="window and min_samples must be >= 1, got 0 and 20"):
        OutputLengthEstimator(window=0)
