"""kv_aware's bounded load: a replica whose every request is a cheap cache hit still gets no
more than its bound of the recent decisions, and the bound can be turned off."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kvtide.router.cost import CostInputs
from kvtide.router.policies import Candidate, PolicyOptions, make_policy
from kvtide.router.types import RoutingMode


def candidate(replica_id: str, cached_tokens: int) -> Candidate:
    inputs = CostInputs(
        num_prompt_tokens=512, num_cached_tokens=cached_tokens, num_expected_output_tokens=16,
        block_size=16, num_running=0, num_waiting=0, num_free_blocks=1000, num_empty_blocks=1000,
    )  # fmt: skip
    return Candidate(replica_id, cached_tokens // 16, inputs, RoutingMode.EXACT)


# "hot" holds the whole prompt; the others hold nothing, so the cost alone picks "hot" always.
FLEET = [candidate("hot", 496), candidate("b", 0), candidate("c", 0), candidate("d", 0)]


def decide(options: PolicyOptions, n: int) -> list[str]:
    policy, rng = make_policy("kv_aware", options), random.Random(0)
    return [FLEET[policy.choose(FLEET, rng).index].replica_id for _ in range(n)]


def test_the_cheapest_replica_gets_at_most_its_bound_of_every_window():
    options = PolicyOptions(balance_slack=0.1, balance_window=16, balance_warmup=4)
    chosen = decide(options, 1000)
    window = options.balance_window * len(FLEET)
    assert chosen[: options.balance_warmup * len(FLEET)] == ["hot"] * 16  # unbounded while warming up
    for end in range(window, len(chosen), 7):
        share = Counter(chosen[end - window : end])["hot"]
        assert share <= (1 + options.balance_slack) * window / len(FLEET) + 2, (end, share)
    assert Counter(chosen)["hot"] < 0.35 * len(chosen)  # a quarter is its share; far from all
    assert set(chosen) == {"hot", "b", "c", "d"}


def test_without_the_bound_the_cheapest_replica_takes_everything():
    assert set(decide(PolicyOptions(balance_slack=None), 300)) == {"hot"}


def test_a_fleet_that_is_all_over_its_bound_still_gets_a_choice():
    policy, rng = make_policy("kv_aware", PolicyOptions(balance_window=4, balance_warmup=1)), random.Random(0)
    for _ in range(50):  # one replica: it is the whole fleet, always at its share
        assert policy.choose(FLEET[:1], rng).index == 0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("balance_slack", -0.1, "balance_slack must be a finite number >= 0 or None, got -0.1"),
        ("balance_slack", float("nan"), "balance_slack must be a finite number >= 0 or None, got nan"),
        ("balance_window", 0, "balance_window must be >= 1, got 0"),
        ("balance_warmup", 0, "balance_warmup must be >= 1, got 0"),
    ],
)
def test_bad_options_name_the_field_and_value(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PolicyOptions(**{field: value})
