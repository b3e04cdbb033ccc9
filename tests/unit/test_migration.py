"""A request whose replica dies mid-stream moves to another with its prompt plus the tokens so
far, and the client sees one stream: greedy output equal to an undisturbed run. A request that
cannot move fails with a retryable UNAVAILABLE, never INTERNAL. Real engines (a tiny model) in
process behind the replica handles, no Ray."""

from __future__ import annotations

import asyncio

import pytest

from kvtide.cluster.frontend.errors import Code, ServingError
from kvtide.cluster.frontend.handles import ReplicaFailed, ReplicaGone
from kvtide.router import ReplicaLoad
from kvtide.workers import Engine, EngineConfig, resolve
from kvtide.workers.model_loader import load_model, read_hf_config
from tests.tiny import write_tiny_llama
from tests.unit.frontend_fakes import EngineReplica, routed_gateway

PROMPT = [5, 17, 33, 41, 60, 7]
GREEDY = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = write_tiny_llama(tmp_path_factory.mktemp("migrate") / "tiny", vocab_size=96)
    return str(model_dir), load_model(model_dir)


def _engine(tiny) -> Engine:
    model_dir, model = tiny
    config = EngineConfig.from_kwargs(model=model_dir, num_blocks=64, block_size=4, max_num_batched_tokens=64)
    return Engine.from_model(model, resolve(config, model_dir, read_hf_config(model_dir)))


def _serve(replicas, params=GREEDY, **config):
    gw, state, lost = routed_gateway(*replicas, **config)
    gw.limits = replicas[0].engine.limits
    for busy in replicas[1:]:  # the first replica looks idlest: the request starts there
        state.router.update_load(busy.replica_id, ReplicaLoad(8, 8, 10, 100, 0.9))

    async def go():
        prepared = await gw.prepare(PROMPT, params)
        return [d async for d in gw.generate(prepared)]

    try:
        return asyncio.run(go()), gw, state, lost
    finally:
        for r in replicas:
            r.close()


def _tokens(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


@pytest.fixture(scope="module")
def undisturbed(tiny) -> list[int]:
    deltas, *_ = _serve([EngineReplica(_engine(tiny))])
    return _tokens(deltas)


def test_a_replica_dying_mid_stream_hands_the_request_on_and_the_client_sees_one_stream(tiny, undisturbed):
    dying = EngineReplica(_engine(tiny), "r0", die_after=5, error=ReplicaGone("replica r0 is unavailable: killed"))
    other = EngineReplica(_engine(tiny), "r1")
    # the router would send the request to the least busy: make r0 look best
    deltas, gw, state, lost = _serve([dying, other])
    assert _tokens(deltas) == undisturbed
    assert deltas[-1].finish_reason == "length" and deltas[-1].usage.completion_tokens == len(undisturbed)
    assert [len(r.output_token_ids) for r in dying.requests] == [0]
    moved = other.requests
    assert len(moved) == 1 and moved[0].prompt_token_ids == tuple(PROMPT)
    assert list(moved[0].output_token_ids) == undisturbed[: len(moved[0].output_token_ids)]
    assert {d.replica_id for d in deltas} <= {"r0", "r1"} and deltas[-1].replica_id == "r1"
    assert lost == ["r0"] and state.router.replica_ids() == ["r1"]
    assert 'kvtide:request_migrations_total 1.0' in gw.metrics.render().decode()


def test_a_failed_step_on_the_only_replica_resumes_there(tiny, undisturbed):
    only = EngineReplica(_engine(tiny), "r0", die_after=3, error=ReplicaFailed("replica r0 failed: a shard died"))
    deltas, *_ = _serve([only])
    assert _tokens(deltas) == undisturbed
    assert [len(r.output_token_ids) for r in only.requests] == [0, 3]  # the second went on after 3


def test_a_request_that_cannot_move_fails_with_a_retryable_error(tiny):
    gone = EngineReplica(_engine(tiny), "r0", die_after=2, error=ReplicaGone("replica r0 is unavailable: killed"))
    with pytest.raises(ServingError) as err:
        _serve([gone])
    assert err.value.code == Code.UNAVAILABLE and "no other replica can take it: retry it" in err.value.message

    sampled = EngineReplica(_engine(tiny), "r0", die_after=2, error=ReplicaFailed("replica r0 failed"))
    with pytest.raises(ServingError) as err:
        _serve([sampled], {**GREEDY, "n": 2})
    assert err.value.code == Code.UNAVAILABLE and "n > 1 is not moved" in err.value.message


def test_moves_are_bounded(tiny):
    flaky = EngineReplica(_engine(tiny), "r0", die_after=1, error=ReplicaFailed("replica r0 failed: again"), deaths=9)
    with pytest.raises(ServingError) as err:
        _serve([flaky], max_migrations=2)
    assert err.value.code == Code.UNAVAILABLE and "moved too often" in err.value.message
