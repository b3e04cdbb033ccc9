"""Property test: random add / schedule / finish / abort / preempt / fork / reset sequences.

Besides the bookkeeping invariants (no leaked or negative references, the hash map a
bijection), the machine simulates what the model runner writes: each scheduled token's id
goes into its slot, CoW pairs copy a block. Every computed token must then read back from
the request's block table — which catches a missed copy-on-write, a stale prefix hit or a
block reused while still referenced. The KV events are replayed into a router-like index
that must equal the pool's cache after every step.
"""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvtide.proto.block_hash import hash_full_blocks, root_hash
from kvtide.proto.kv_events import AllBlocksCleared, BlocksRemoved, BlocksStored
from kvtide.workers.kv_cache_manager import KVCacheManager
from kvtide.workers.request import Request, RequestId
from kvtide.workers.sampling_params import SamplingParams

BLOCK_SIZE = 4
NUM_BLOCKS = 6
SHARED_PREFIX = [5, 5, 5, 5, 6, 6, 6, 6]

# Tokens from a two-letter alphabet, often behind a common prefix, so blocks repeat.
prompts = st.one_of(
    st.builds(
        lambda head, tail: head + tail,
        st.sampled_from([[], SHARED_PREFIX]),
        st.lists(st.integers(0, 1), min_size=1, max_size=12),
    ),
    st.sampled_from([SHARED_PREFIX, SHARED_PREFIX + [0, 1, 0, 1]]),
)


class KVCacheMachine(RuleBasedStateMachine):
    @initialize(enable_caching=st.booleans())
    def setup(self, enable_caching):
        self.kv = KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, enable_caching)
        self.live: dict[str, Request] = {}
        self.num_added = 0
        # The simulated KV: block id -> the token id written in each slot.
        self.content: dict[int, list[int | None]] = {
            b: [None] * BLOCK_SIZE for b in range(NUM_BLOCKS)
        }
        self.index: set[bytes] = set()  # what a router learns from the events
        self.next_event_id = 0
        self.hash_tokens: dict[bytes, tuple[int, ...]] = {}
        self.hash_parent: dict[bytes, bytes | None] = {}

    def _pick(self, i: int, running: bool | None = None) -> Request | None:
        reqs = [
            r for r in self.live.values() if running is None or bool(r.block_ids) == running
        ]
        return reqs[i % len(reqs)] if reqs else None

    @rule(prompt=prompts)
    def add(self, prompt):
        rid = f"r{self.num_added}"
        self.num_added += 1
        self.live[rid] = Request(RequestId(rid), prompt, SamplingParams())

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 50), chunk=st.integers(1, 10), token=st.integers(0, 1))
    def schedule_one(self, i, chunk, token):
        self._schedule(self._pick(i), chunk, token)

    @precondition(lambda self: self.live)
    @rule(chunk=st.integers(1, 10), tokens=st.lists(st.integers(0, 1), min_size=8, max_size=8))
    def step(self, chunk, tokens):
        """Schedule every live request once, in arrival order, as one engine step would."""
        for req, token in zip(list(self.live.values()), tokens * 4):
            self._schedule(req, chunk, token)

    def _schedule(self, req, chunk, token):
        kv, pool = self.kv, self.kv.pool
        if req.block_ids or req.num_computed_tokens:
            computed = None
            base = req.num_computed_tokens
            if base == req.num_tokens:  # decode: the token sampled last step
                req.append_output_token(token)
        else:
            computed = kv.get_computed_blocks(req)
            base = computed.num_computed_tokens
            assert base < req.num_tokens
        num_new = min(chunk, req.num_tokens - base)
        before = (
            [pool.ref_count(b) for b in range(NUM_BLOCKS)],
            dict(pool.cached_blocks),
            list(req.block_ids),
            req.num_computed_tokens,
            req.num_cached_prompt_tokens,
        )
        num_free = kv.num_free_blocks
        copies = kv.allocate_slots(req, num_new, computed)
        if copies is None:
            after = (
                [pool.ref_count(b) for b in range(NUM_BLOCKS)],
                dict(pool.cached_blocks),
                list(req.block_ids),
                req.num_computed_tokens,
                req.num_cached_prompt_tokens,
            )
            assert after == before
            # At most the whole table plus one CoW block can be needed.
            assert num_free < kv.num_blocks_needed(base + num_new) + 1
            return
        for src, dst in copies:
            assert pool.ref_count(dst) == 1
            self.content[dst] = list(self.content[src])
        tokens = req.all_token_ids
        for pos in range(base, base + num_new):
            block = req.block_ids[pos // BLOCK_SIZE]
            assert pool.ref_count(block) == 1, f"write into shared block {block}"
            self.content[block][pos % BLOCK_SIZE] = tokens[pos]
        req.num_computed_tokens = base + num_new

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 50))
    def finish_or_abort(self, i):
        # The KV manager sees finish and abort alike: free the blocks, forget the request.
        req = self._pick(i)
        self.kv.free(req)
        del self.live[req.request_id]

    @precondition(lambda self: any(r.block_ids for r in self.live.values()))
    @rule(i=st.integers(0, 50))
    def preempt(self, i):
        req = self._pick(i, running=True)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1

    @precondition(lambda self: any(r.block_ids for r in self.live.values()))
    @rule(i=st.integers(0, 50))
    def fork(self, i):
        parent = self._pick(i, running=True)
        rid = f"r{self.num_added}"
        self.num_added += 1
        child = Request(
            RequestId(rid), list(parent.prompt_token_ids), parent.params, parent_id=parent.request_id
        )
        child.output_token_ids = list(parent.output_token_ids)
        self.kv.fork(parent, child)
        self.live[rid] = child

    @rule(attempt=st.integers(0, 7))
    def reset_prefix_cache(self, attempt):
        if attempt:  # rarely: a reset empties the cache the other rules want to hit
            return
        idle = all(not r.block_ids for r in self.live.values())
        assert self.kv.reset_prefix_cache() == idle

    @invariant()
    def references_balance(self):
        pool = self.kv.pool
        refs = [pool.ref_count(b) for b in range(NUM_BLOCKS)]
        assert min(refs) >= 0
        assert sum(len(r.block_ids) for r in self.live.values()) == sum(refs)
        assert pool.num_free_blocks == refs.count(0)
        assert self.kv.usage == 1 - refs.count(0) / NUM_BLOCKS

    @invariant()
    def block_tables_hold_the_computed_tokens(self):
        for req in self.live.values():
            assert len(set(req.block_ids)) == len(req.block_ids)
            assert len(req.block_ids) == self.kv.num_blocks_needed(req.num_computed_tokens)
            assert all(self.kv.pool.ref_count(b) >= 1 for b in req.block_ids)
            tokens = req.all_token_ids
            for pos in range(req.num_computed_tokens):
                slot = self.content[req.block_ids[pos // BLOCK_SIZE]][pos % BLOCK_SIZE]
                assert slot == tokens[pos], (req.request_id, pos)

    @invariant()
    def cache_is_a_bijection_of_correct_blocks(self):
        pool = self.kv.pool
        for req in self.live.values():
            expected = hash_full_blocks(req.all_token_ids, BLOCK_SIZE)
            assert req.block_hashes == expected[: len(req.block_hashes)]
            tokens = req.all_token_ids
            for i, h in enumerate(req.block_hashes):
                self.hash_tokens[h] = tuple(tokens[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
                self.hash_parent[h] = req.block_hashes[i - 1] if i else None
        cached = dict(pool.cached_blocks)
        for h, b in cached.items():
            assert pool.cached_hash(b) == h
            assert tuple(self.content[b]) == self.hash_tokens[h]
        num_hashed = sum(pool.cached_hash(b) is not None for b in range(NUM_BLOCKS))
        assert num_hashed == len(cached)
        if not self.kv.enable_prefix_caching:
            assert not cached

    @invariant()
    def events_replay_to_the_cache(self):
        for event in self.kv.take_events():
            assert event.event_id == self.next_event_id
            self.next_event_id += 1
            match event:
                case BlocksStored(block_hashes=hashes, parent_hash=parent):
                    assert hashes
                    assert self.hash_parent[hashes[0]] == parent
                    for prev, h in zip(hashes, hashes[1:]):
                        assert self.hash_parent[h] == prev
                    assert not self.index & set(hashes)
                    self.index |= set(hashes)
                case BlocksRemoved(block_hashes=hashes):
                    assert set(hashes) <= self.index
                    self.index -= set(hashes)
                case AllBlocksCleared():
                    self.index.clear()
        assert self.index == set(self.kv.pool.cached_blocks)
        assert root_hash() not in self.index


KVCacheMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None, derandomize=True
)
TestKVCacheMachine = KVCacheMachine.TestCase
