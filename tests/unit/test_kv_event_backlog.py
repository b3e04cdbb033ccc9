"""The block pool's pending KV events stay bounded when nobody drains them (the offline
``LLM``, a replica that publishes nowhere), and a consumer that attaches late still ends with
the pool's exact cache: snapshot first, then the events after it (issue 15, item 5)."""

from __future__ import annotations

import pytest
import torch

from kvtide.proto.block_hash import HASH_VERSION, BlockHash
from kvtide.proto.kv_events import AllBlocksCleared, BlocksRemoved, BlocksStored, KvEvent
from kvtide.router import ReplicaRegistration, Router
from kvtide.workers.block_pool import BlockPool
from kvtide.workers.config import EngineConfig, resolve
from kvtide.workers.engine import Engine
from kvtide.workers.llm import LLM
from kvtide.workers.model_loader import load_model, read_hf_config
from kvtide.workers.sampling_params import SamplingParams
from tests.tiny import write_tiny_llama

NUM_BLOCKS = 64
BLOCK_SIZE = 4
PARAMS = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=4)


def num_hashes(events: list[KvEvent]) -> int:
    return sum(1 if isinstance(e, AllBlocksCleared) else len(e.block_hashes) for e in events)


def prompts(first: int, num: int) -> list[list[int]]:
    """Distinct 13-token prompts (3 full blocks each), so every request stores new blocks
    and, once the cache is full, evicts old ones."""
    return [[3 + (7 * i + j) % 90 for j in range(13)] for i in range(first, first + num)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, torch.nn.Module]:
    d = write_tiny_llama(tmp_path_factory.mktemp("backlog") / "tiny")
    return str(d), load_model(d)


@pytest.fixture
def llm(tiny) -> LLM:
    """A fresh engine (an empty backlog) around the module's model."""
    model_dir, model = tiny
    config = EngineConfig.from_kwargs(
        model=model_dir, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_seqs=8, max_num_batched_tokens=64
    )
    return LLM(engine=Engine.from_model(model, resolve(config, model_dir, read_hf_config(model_dir))))


def router_for(num_blocks: int) -> Router:
    router = Router(block_size=BLOCK_SIZE, sync_timeout_s=1e9)
    router.register(ReplicaRegistration("r0", BLOCK_SIZE, b"", HASH_VERSION, num_blocks, "m"))
    return router


def indexed(router: Router) -> set[BlockHash]:
    return set(router._index._replica_exact["r0"])


def test_sixty_offline_requests_leave_a_bounded_backlog_and_a_late_consumer_is_exact(llm):
    for batch in range(3):
        outs = llm.generate(prompts(20 * batch, 20), PARAMS)
        assert [len(o.outputs[0].token_ids) for o in outs] == [4] * 20
    # A consumer attaches now, after 60 requests nobody drained: its snapshot, then the
    # backlog, which holds at most one turnover of the cache (unbounded, 60 requests of 3
    # blocks leave 180 stored hashes alone).
    snapshot = llm.engine.kv_snapshot()
    backlog = llm.engine.drain_kv_events()
    assert 0 < num_hashes(backlog) <= 2 * NUM_BLOCKS
    assert backlog[0].event_id > 0  # the oldest were dropped
    router = router_for(NUM_BLOCKS)
    router.resync("r0", *snapshot)
    assert router.apply_events("r0", backlog)  # all older than the snapshot: skipped
    pool = llm.engine.kv.pool
    assert indexed(router) == set(pool.cached_blocks)
    llm.generate(prompts(60, 10), PARAMS)  # stores and evicts more
    assert router.apply_events("r0", llm.engine.drain_kv_events())
    assert indexed(router) == set(pool.cached_blocks) != set()


def test_a_consumer_that_drains_before_its_snapshot_sees_the_gap_and_heals(llm):
    llm.generate(prompts(0, 60), PARAMS)
    events = llm.engine.drain_kv_events()
    assert events and events[0].event_id > 0  # the oldest were dropped
    assert [e.event_id for e in events] == list(range(events[0].event_id, events[-1].event_id + 1))
    router = router_for(NUM_BLOCKS)
    assert not router.apply_events("r0", events)  # a gap: it must resync
    router.resync("r0", *llm.engine.kv_snapshot())
    cached = set(llm.engine.kv.pool.cached_blocks)
    assert indexed(router) == cached != set()


def h(i: int) -> BlockHash:
    return BlockHash(i.to_bytes(32, "big"))


def test_the_oldest_events_are_dropped_first_and_ids_keep_counting():
    pool = BlockPool(2, enable_caching=True)  # the backlog keeps at most 4 hashes
    for i in range(3):
        blocks = pool.allocate(2)  # evicts the previous round's two hashes
        pool.cache_full_blocks(blocks, [h(2 * i), h(2 * i + 1)], None)
        pool.free(reversed(blocks))
    assert pool.num_pending_hashes == 4
    assert pool.num_events_dropped == 3
    assert pool.drain_events() == [
        BlocksRemoved(3, (h(3), h(2))),  # tail first, as freed
        BlocksStored(4, (h(4), h(5)), None),
    ]
    assert pool.num_pending_hashes == 0
    assert pool.drain_events() == []
