"""A Replica (engine + Ray shards) on a real two-node Ray cluster on 127.0.0.1 (CPU, gloo).

Greedy output through a replica must be token-identical to the single-device engine, for
tensor and pipeline parallel shapes of SmolLM2-135M and as a real Ray actor streaming its
deltas. A shard that dies or raises mid-request must end that request's stream with an
"error" delta, get the replica's shards restarted (no orphan processes, no leaked placement
groups), and leave the replica serving correct output.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import psutil
import pytest
import ray

from kvtide.cluster.replica.actor import Replica, ReplicaActor
from kvtide.cluster.replica.spec import ReplicaSpec
from kvtide.workers.config import EngineConfig, resolve
from kvtide.workers.engine import Engine
from kvtide.workers.model_files import resolve_model
from kvtide.workers.model_loader import load_model, read_hf_config
from kvtide.workers.outputs import CompletionDelta
from kvtide.workers import EngineRequest
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.tokenizer import Tokenizer
from tests.tiny import write_tiny_llama

# About a minute on 2 cores: four replicas start (three of SmolLM2) and the tiny one
# restarts twice.
pytestmark = pytest.mark.slow

NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
"""EOS is banned (min_tokens) so every request runs the same number of steps on both sides."""
NUM_BLOCKS = 64
TINY_NUM_BLOCKS = 256
LONG_TOKENS = 3000
LONG = SamplingParams(temperature=0.0, max_tokens=LONG_TOKENS, min_tokens=LONG_TOKENS)
"""Runs for many seconds: long enough to break a shard mid-request."""
STARTUP_TIMEOUT_S = 180.0
STREAM_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 15.0
SMOL_TEXTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, a small"]
TINY_PROMPTS = [[5, 9, 17, 3, 44, 60, 7, 12, 30, 2, 81], [70, 8, 19, 33, 4, 52, 11]]
SHAPES = [(3, 1), (1, 2), (1, 3)]  # (tp, pp); SmolLM2 has 9 heads, 3 KV heads, 30 layers


# -- references -----------------------------------------------------------------------------


def reference_tokens(model_dir: Path, prompts: Sequence[Sequence[int]], num_blocks: int) -> list[list[int]]:
    """Greedy tokens of the single-device engine, all prompts batched as the replica gets them."""
    config = EngineConfig.from_kwargs(model=str(model_dir), num_blocks=num_blocks)
    resolved = resolve(config, str(model_dir), read_hf_config(model_dir))
    engine = Engine.from_model(load_model(model_dir), resolved)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(10 * NEW_TOKENS):
        if not engine.has_unfinished_requests():
            break
        for delta in engine.step():
            assert delta.finish_reason in (None, "length")
            out[int(delta.request_id)].extend(delta.token_ids)
    assert [len(t) for t in out] == [NEW_TOKENS] * len(prompts)
    return out


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def smol_prompts(smol_dir) -> list[list[int]]:
    tok = Tokenizer.from_dir(smol_dir)
    return [tok.encode(text) for text in SMOL_TEXTS]


@pytest.fixture(scope="module")
def smol_reference(smol_dir, smol_prompts) -> list[list[int]]:
    return reference_tokens(smol_dir, smol_prompts, NUM_BLOCKS)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    # NOTE: the cluster's nodes share this machine, so the replica actor reads the same path.
    return write_tiny_llama(tmp_path_factory.mktemp("replica") / "tiny", num_layers=4, max_position=4096)


@pytest.fixture(scope="module")
def tiny_reference(tiny_dir) -> list[list[int]]:
    return reference_tokens(tiny_dir, TINY_PROMPTS, TINY_NUM_BLOCKS)


# -- helpers --------------------------------------------------------------------------------


def request(prompt: Sequence[int], params: SamplingParams) -> EngineRequest:
    return EngineRequest(f"req-{uuid.uuid4().hex[:12]}", tuple(prompt), params)


def tokens_of(deltas: list[CompletionDelta]) -> list[int]:
    """The tokens of one finished choice, checking that only its last delta finishes it."""
    assert deltas, "the stream ended without a delta"
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].finish_reason == "length", deltas[-1]
    return [t for d in deltas for t in d.token_ids]


async def _collect(stream) -> list[CompletionDelta]:
    return [d async for d in stream]


def generate_local(replica: Replica, prompts: Sequence[Sequence[int]]) -> list[list[CompletionDelta]]:
    """Every prompt submitted at once to a plain (in-process) Replica."""

    async def run():
        streams = (_collect(replica.generate(request(p, GREEDY))) for p in prompts)
        return await asyncio.wait_for(asyncio.gather(*streams), STREAM_TIMEOUT_S)

    return asyncio.run(run())


async def _stream_actor(
    actor, prompt, params, on_delta: Callable[[int], Awaitable[None]] | None
) -> list[CompletionDelta]:
    gen = actor.generate.options(num_returns="streaming").remote(request(prompt, params))
    deltas = []
    async for ref in gen:
        deltas.append(await ref)
        if on_delta is not None:
            await on_delta(len(deltas))
    return deltas


def stream_actor(actor, prompts, params, on_delta=None) -> list[list[CompletionDelta]]:
    """Stream every prompt at once through a ReplicaActor; bounded by STREAM_TIMEOUT_S."""

    async def run():
        streams = (_stream_actor(actor, p, params, on_delta) for p in prompts)
        return await asyncio.wait_for(asyncio.gather(*streams), STREAM_TIMEOUT_S)

    return asyncio.run(run())


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_exited(pids, what: str) -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while (alive := [p for p in pids if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"{what}: still running after {EXIT_TIMEOUT_S} s: {alive}"


def live_placement_groups() -> list[str]:
    return [gid for gid, g in ray.util.placement_group_table().items() if g["state"] != "REMOVED"]


# -- SmolLM2 through a plain Replica ----------------------------------------------------------


@pytest.mark.parametrize(("tp", "pp"), SHAPES, ids=[f"tp{tp}-pp{pp}" for tp, pp in SHAPES])
def test_smollm2_greedy_matches_single_device(cluster, smol_prompts, smol_reference, tp, pp):
    groups_before = live_placement_groups()
    replica = Replica(
        ReplicaSpec.load("smollm2-135m", tp, pp, cpus_per_shard=1.0, start_timeout_s=STARTUP_TIMEOUT_S,
                         num_blocks=NUM_BLOCKS)  # fmt: skip
    )
    try:
        outputs = generate_local(replica, smol_prompts)
        assert [tokens_of(d) for d in outputs] == smol_reference

        nodes = replica.shard_nodes()
        assert sorted(nodes) == [(s, r) for s in range(pp) for r in range(tp)]
        stage_nodes = [{nodes[(s, r)] for r in range(tp)} for s in range(pp)]
        assert all(len(n) == 1 for n in stage_nodes), f"a stage's TP ranks span nodes: {stage_nodes}"
        assert len(set.union(*stage_nodes)) == min(pp, 2)  # stages spread over both nodes
        pids = list(replica.shard_pids().values())
        assert replica.num_restarts() == 0
    finally:
        asyncio.run(replica.shutdown())
    asyncio.run(replica.shutdown())  # idempotent
    assert_exited(pids, "shards after shutdown")
    assert live_placement_groups() == groups_before


# -- a tiny model through a ReplicaActor ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_actor(cluster, tiny_dir):
    """A TP=2 replica actor shared by the tests below, in definition order.
    NOTE: the last test of this module shuts it down; teardown then only kills the actor."""
    actor = ReplicaActor.options(num_cpus=0).remote(
        ReplicaSpec.load(str(tiny_dir), tp=2, cpus_per_shard=1.0, start_timeout_s=STARTUP_TIMEOUT_S,
                         num_blocks=TINY_NUM_BLOCKS)  # fmt: skip
    )
    assert ray.get(actor.health.remote(), timeout=STARTUP_TIMEOUT_S + 60)  # its shards started
    yield actor
    try:
        ray.get(actor.shutdown.remote(), timeout=EXIT_TIMEOUT_S)
    finally:
        ray.kill(actor)


def test_actor_streams_greedy_output_of_single_device(tiny_actor, tiny_reference):
    outputs = stream_actor(tiny_actor, TINY_PROMPTS, GREEDY)
    assert [tokens_of(d) for d in outputs] == tiny_reference
    assert all(len(d) == NEW_TOKENS for d in outputs)  # one delta per token, streamed
    assert ray.get(tiny_actor.health.remote(), timeout=STREAM_TIMEOUT_S) is True


def break_mid_request(actor, tiny_reference, breaker: Callable[[], Awaitable[None]]) -> None:
    """Start a long request, break a shard once it is decoding, and check the replica: the
    request ends with an "error" delta, every old shard is gone, one restart happened, and
    the next requests get the right tokens."""
    restarts = ray.get(actor.num_restarts.remote())
    old_pids = ray.get(actor.shard_pids.remote())

    async def on_delta(n: int) -> None:
        if n == 3:
            await breaker()

    (deltas,) = stream_actor(actor, [TINY_PROMPTS[0]], LONG, on_delta)
    assert deltas[-1].finish_reason == "error", deltas[-1]
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert 3 <= len(deltas) - 1 < LONG_TOKENS

    outputs = stream_actor(actor, TINY_PROMPTS, GREEDY)
    assert [tokens_of(d) for d in outputs] == tiny_reference
    assert ray.get(actor.num_restarts.remote()) == restarts + 1
    new_pids = ray.get(actor.shard_pids.remote())
    assert not set(new_pids.values()) & set(old_pids.values())
    assert_exited(old_pids.values(), "the failed replica's shards")
    assert len(live_placement_groups()) == 1  # the fresh TP=2 stage; the old one was freed


def test_killed_shard_fails_the_request_and_the_replica_recovers(tiny_actor, tiny_reference):
    victim = ray.get(tiny_actor.shard_pids.remote())[(0, 1)]

    async def kill() -> None:
        os.kill(victim, signal.SIGKILL)

    break_mid_request(tiny_actor, tiny_reference, kill)


def test_shard_exception_fails_the_request_and_the_replica_recovers(tiny_actor, tiny_reference):
    async def inject() -> None:
        await tiny_actor.inject_shard_failure.remote(0, 1)

    break_mid_request(tiny_actor, tiny_reference, inject)


def test_actor_shutdown_leaves_no_process(tiny_actor):
    pids = ray.get(tiny_actor.shard_pids.remote()).values()
    ray.get(tiny_actor.shutdown.remote(), timeout=EXIT_TIMEOUT_S)
    ray.get(tiny_actor.shutdown.remote(), timeout=EXIT_TIMEOUT_S)  # idempotent
    assert_exited(pids, "shards after shutdown")
    assert live_placement_groups() == []
