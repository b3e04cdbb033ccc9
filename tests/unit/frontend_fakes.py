"""A gateway on a word-level tokenizer and fake replica handles: the frontend without Ray."""

from __future__ import annotations

import asyncio

import tokenizers

from kvtide.cluster.frontend.cluster_state import ClusterState
from kvtide.cluster.frontend.gateway import Gateway
from kvtide.cluster.frontend.handles import StreamCancelled
from kvtide.cluster.frontend.replicas import ReplicaSet
from kvtide.cluster.frontend.requests import FrontendConfig
from kvtide.proto.block_hash import HASH_VERSION
from kvtide.router import ReplicaLoad, ReplicaRegistration, Router
from kvtide.workers import CompletionDelta, RequestLimits
from kvtide.workers.tokenizer import Tokenizer, TokenizerConfig

KEY = "k-123"
WORDS = ["<unk>", "hello", "world", "tide", "user", "assistant", ":", "STOP", "the", "end"]
TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}assistant :"
LIMITS = RequestLimits(max_model_len=8, vocab_size=len(WORDS), max_num_seqs=4, num_blocks=100, block_size=4)


def word_tokenizer() -> Tokenizer:
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    return Tokenizer(backend, TokenizerConfig(chat_template=TEMPLATE))


def make_gateway(replicas: ReplicaSet | None = None, **config) -> Gateway:
    frontend = FrontendConfig(**{"api_keys": (KEY,), "max_message_bytes": 1000, **config})
    return Gateway("tiny", LIMITS, word_tokenizer(), replicas or ReplicaSet({}), frontend)


def routed_gateway(*replicas: FakeReplica, **config) -> tuple[Gateway, ClusterState, list[str]]:
    """A gateway whose router knows ``replicas`` (no Redis, nothing polled), and the list of
    replicas the cluster state reported lost."""
    router = Router("kv_aware", block_size=LIMITS.block_size)
    handles = {r.replica_id: r for r in replicas}
    state = ClusterState(router, handles, None)
    for r in replicas:
        state.register(ReplicaRegistration(r.replica_id, LIMITS.block_size, b"", HASH_VERSION, 100, "tiny"))
    lost: list[str] = []
    state.on_replica_lost = lost.append
    return make_gateway(ReplicaSet(handles, state), **config), state, lost


class FakeReplica:
    """A ``ReplicaHandle``: each choice streams ``tokens`` (one per step, ``delay_s`` apart;
    the last finishes with "length"), or raises ``error`` at the first delta. Records the
    requests it started and the aborts it got."""

    def __init__(self, replica_id: str = "r0", tokens=(1, 1, 1), delay_s: float = 0.05, error=None,
                 choice_tokens: dict[int, tuple[int, ...]] | None = None) -> None:  # fmt: skip
        """``choice_tokens`` gives some choices tokens of their own (same length as ``tokens``)."""
        self.replica_id = replica_id
        self.tokens, self.delay_s, self.error = tuple(tokens), delay_s, error
        self.choice_tokens = choice_tokens or {}
        self.started: list[str] = []
        self.aborted: list[tuple[str, int | None]] = []
        self.requests = []

    def generate(self, request) -> FakeStream:
        self.started.append(request.request_id)
        self.requests.append(request)
        return FakeStream(self, request)

    def abort(self, request_id: str, index: int | None = None) -> None:
        self.aborted.append((request_id, index))

    async def load(self) -> ReplicaLoad:
        if self.error is not None:
            raise self.error
        return ReplicaLoad(0, 0, 100, 100, 0.0)

    async def kv_snapshot(self):
        return (-1, ())

    async def alive(self) -> bool:
        return True


class FakeStream:
    def __init__(self, replica: FakeReplica, request) -> None:
        self._replica, self._request = replica, request
        self._deltas = self._gen()
        self._cancelled = False
        self._done = False

    async def _gen(self):
        n, steps = self._request.params.n, len(self._replica.tokens)
        for step in range(steps):
            await asyncio.sleep(self._replica.delay_s)
            if self._replica.error is not None:
                raise self._replica.error
            for index in range(n):
                finish = "length" if step == steps - 1 else None
                own = self._replica.choice_tokens.get(index, self._replica.tokens)[step]
                yield CompletionDelta(self._request.request_id, index, (own,), finish_reason=finish)

    def __aiter__(self):
        return self

    async def __anext__(self) -> CompletionDelta:
        if self._cancelled:
            raise StreamCancelled("the request was cancelled")
        try:
            return await anext(self._deltas)
        except StopAsyncIteration:
            self._done = True
            raise

    def cancel(self) -> None:
        self._cancelled = True

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._replica.abort(self._request.request_id)
        await self._deltas.aclose()


class EngineReplica:
    """A ``ReplicaHandle`` over a real in-process ``AsyncEngine`` (a tiny model): the gateway's
    whole path, no Ray."""

    def __init__(self, engine, replica_id: str = "r0", die_after: int | None = None, error=None, deaths: int = 1) -> None:
        """``die_after``: the first ``deaths`` streams raise ``error`` after that many deltas (a
        replica that dies, or fails its step, mid-stream)."""
        from kvtide.workers import AsyncEngine

        self.replica_id = replica_id
        self.engine = engine
        self.async_engine = AsyncEngine(engine, idle_wait_s=0.02)
        self.aborted: list[tuple[str, int | None]] = []
        self.requests: list = []
        self.die_after, self.error, self.deaths = die_after, error, deaths

    def generate(self, request) -> _EngineStream:
        self.requests.append(request)
        return _EngineStream(self, request)

    def abort(self, request_id: str, index: int | None = None) -> None:
        self.aborted.append((request_id, index))
        self.async_engine.abort(request_id, index)

    async def load(self) -> ReplicaLoad:
        s = self.engine.stats()
        return ReplicaLoad(s.num_running, s.num_waiting, s.num_free_blocks, self.engine.config.num_blocks, s.kv_cache_usage)

    async def kv_snapshot(self):
        return self.engine.kv_snapshot()

    async def alive(self) -> bool:
        return True

    def close(self) -> None:
        self.async_engine.shutdown(timeout_s=5.0)


class _EngineStream:
    def __init__(self, replica: EngineReplica, request) -> None:
        self._replica, self._request = replica, request
        self._gen = replica.async_engine.generate(request)
        self._done = False
        self._dies_after = None
        if replica.die_after is not None and replica.deaths > 0:
            replica.deaths -= 1
            self._dies_after = replica.die_after

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._dies_after is not None:
            if self._dies_after == 0:
                self._replica.abort(self._request.request_id)  # the engine goes with the process
                raise self._replica.error
            self._dies_after -= 1
        try:
            return await anext(self._gen)
        except StopAsyncIteration:
            self._done = True
            raise

    def cancel(self) -> None:
        self._replica.abort(self._request.request_id)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._replica.abort(self._request.request_id)
        await self._gen.aclose()
