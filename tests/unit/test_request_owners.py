"""One owner for each piece of a served request's work: checked once (``check_request``, at the
gateway), detokenized once and its stop strings found once (the gateway's detokenizer; the
engine emits token ids only), and a stop string found at the gateway aborts the request on its
replica, which frees its blocks within one step. The gateway runs over a real in-process
engine (a tiny model), no Ray."""

from __future__ import annotations

import asyncio

import pytest
import tokenizers

from kvtide.cluster.frontend.replicas import ReplicaSet
from kvtide.workers import CompletionDelta, Engine, EngineConfig, IncrementalDetokenizer, resolve
from kvtide.workers.model_loader import load_model, read_hf_config
from kvtide.workers.tokenizer import Tokenizer, TokenizerConfig
from tests.tiny import write_tiny_llama
from tests.unit.frontend_fakes import EngineReplica, FakeReplica, make_gateway, routed_gateway

VOCAB = 96
PROMPT = [5, 17, 33, 41, 60, 7]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = write_tiny_llama(tmp_path_factory.mktemp("tiny"), vocab_size=VOCAB)
    return str(model_dir), load_model(model_dir)


def _engine(tiny) -> Engine:
    model_dir, model = tiny
    config = EngineConfig.from_kwargs(model=model_dir, num_blocks=64, block_size=4, max_num_seqs=8,
                                      max_num_batched_tokens=64)  # fmt: skip
    return Engine.from_model(model, resolve(config, model_dir, read_hf_config(model_dir)))


def _bracket_tokenizer() -> Tokenizer:
    """Token i is the word "[i]": no word is a substring of another, so a stop string "[i]"
    matches exactly where token i was generated."""
    words = {f"[{i}]": i for i in range(VOCAB)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="[0]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##")
    return Tokenizer(backend, TokenizerConfig())


def _serving(tiny):
    engine = _engine(tiny)
    replica = EngineReplica(engine)
    gw = make_gateway(ReplicaSet({"r0": replica}))
    gw.limits = engine.limits
    gw.tokenizer = _bracket_tokenizer()
    return engine, replica, gw


def _greedy(tiny, max_tokens: int) -> list[int]:
    engine = _engine(tiny)
    engine.add_request("ref", PROMPT, _params(max_tokens))
    tokens = []
    while engine.has_unfinished_requests():
        tokens += [t for d in engine.step() for t in d.token_ids]
    return tokens


def _params(max_tokens: int, **kw) -> dict:
    from kvtide.workers import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


async def _serve(gw, params: dict) -> list:
    prepared = await gw.prepare(PROMPT, params)
    return [d async for d in gw.generate(prepared)]


def test_a_served_request_is_checked_once_and_its_engine_deltas_carry_no_text(tiny, monkeypatch):
    engine, replica, gw = _serving(tiny)
    calls = []
    import kvtide.cluster.frontend.gateway as gateway_module
    import kvtide.workers.async_engine as async_module
    import kvtide.workers.engine as engine_module

    for module in (gateway_module, async_module, engine_module):
        original = module.check_request
        monkeypatch.setattr(module, "check_request", lambda *a, _o=original, _m=module.__name__: calls.append(_m) or _o(*a))
    deltas_seen: list[CompletionDelta] = []
    original_generate = replica.async_engine.generate

    async def spy(request):
        async for d in original_generate(request):
            deltas_seen.append(d)
            yield d

    replica.async_engine.generate = spy
    try:
        for n in (1, 2):
            asyncio.run(_serve(gw, {"max_tokens": 4, "temperature": 0.0, "n": n, "ignore_eos": True}))
    finally:
        replica.close()
    assert calls == ["kvtide.cluster.frontend.gateway"] * 2  # once per request, at the gateway
    assert deltas_seen and not any(hasattr(d, "text") for d in deltas_seen)
    assert "text" not in CompletionDelta.__dataclass_fields__ and not hasattr(engine, "tokenizer")


def test_each_token_is_detokenized_once_at_the_gateway(tiny, monkeypatch):
    engine, replica, gw = _serving(tiny)
    pushed = []
    original = IncrementalDetokenizer.push
    monkeypatch.setattr(IncrementalDetokenizer, "push", lambda self, ids, final=False: pushed.extend(ids) or original(self, ids, final))
    try:
        deltas = asyncio.run(_serve(gw, {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}))
    finally:
        replica.close()
    generated = [t for d in deltas for t in d.token_ids]
    assert pushed == generated == _greedy(tiny, 6)
    assert "".join(d.text for d in deltas) == "".join(f" [{t}]" for t in generated)  # after the prompt's words


def test_a_stop_string_found_at_the_gateway_aborts_the_request_and_frees_its_blocks_within_one_step(tiny):
    reference = _greedy(tiny, 12)
    k = next(i for i in range(2, 12) if reference[i] not in reference[:i])  # its first appearance
    stop = f"[{reference[k]}]"
    engine, replica, gw = _serving(tiny)
    steps: list[int] = []
    original_step = engine.step
    engine.step = lambda: steps.append(1) or original_step()
    aborted_at: list[int] = []
    original_abort = replica.abort
    replica.abort = lambda rid, index=None: aborted_at.append(len(steps)) or original_abort(rid, index)

    async def go():
        deltas = await _serve(gw, {"max_tokens": 40, "temperature": 0.0, "ignore_eos": True, "stop": [stop]})
        for _ in range(200):  # bounded: the engine thread applies the abort before its next step
            if not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        return deltas

    try:
        deltas = asyncio.run(go())
    finally:
        replica.close()
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == reference[: k + 1]  # up to and including the token that completed the stop
    last = deltas[-1]
    assert (last.finish_reason, last.stop_reason) == ("stop", stop)
    assert last.usage.completion_tokens == k + 1
    assert "".join(d.text for d in deltas) == "".join(f" [{t}]" for t in reference[:k]) + " "
    assert aborted_at, "the gateway never aborted the request on its replica"
    assert not engine.has_unfinished_requests() and engine.stats().kv_cache_usage == 0.0
    assert len(steps) - aborted_at[0] <= 1, f"{len(steps) - aborted_at[0]} steps ran after the abort"
    assert len(steps) < 40


def test_a_stop_string_ends_one_choice_and_aborts_only_it_while_the_others_go_on():
    stop_word, hello = 7, 1  # frontend_fakes.WORDS: 7 is "STOP", 1 is "hello"
    replica = FakeReplica(tokens=(hello, stop_word, hello, hello), delay_s=0.01, choice_tokens={1: (hello,) * 4})
    gw, _, _ = routed_gateway(replica)

    async def go():
        prepared = await gw.prepare("hello", {"max_tokens": 4, "n": 2, "stop": ["STOP"]})
        return [d async for d in gw.generate(prepared)]

    deltas = asyncio.run(go())
    by_choice = {i: [d for d in deltas if d.index == i] for i in (0, 1)}
    assert [d.finish_reason for d in by_choice[0]] == [None, "stop"] and by_choice[0][-1].stop_reason == "STOP"
    assert sum(len(d.token_ids) for d in by_choice[1]) == 4 and by_choice[1][-1].finish_reason == "length"
    rid = replica.started[0]
    assert replica.aborted == [(rid, 0)]  # choice 0 alone; the stream ended by itself
    assert deltas[-1].usage.completion_tokens == 2 + 4
