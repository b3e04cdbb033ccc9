"""Engine on a tiny random Llama (CPU, float32): batching invariance, n > 1, stops, aborts,
bad input and a failing forward pass. Prompts are token ids; the engine has no tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from kvtide.workers.config import EngineConfig, resolve
from kvtide.workers.engine import Engine
from kvtide.workers.engine_request import check_request
from kvtide.workers.model_loader import load_model, read_hf_config
from kvtide.workers.model_runner import LocalExecutor
from kvtide.workers.request import RequestStatus
from kvtide.workers.sampling_params import SamplingParams
from tests.tiny import write_tiny_llama

VOCAB_SIZE = 96
NEW_TOKENS = 12
# min_tokens bans EOS, so every greedy run yields exactly NEW_TOKENS tokens.
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
PROMPTS = {
    "p5": [5, 17, 33, 41, 60],
    "p9": [7, 7, 8, 90, 12, 13, 40, 41, 3],
    "p13": [5, 17, 33, 41, 60, 61, 62, 63, 70, 71, 72, 73, 11],  # shares 4 tokens with p5
    "p17": [int(t) for t in torch.arange(20, 37)],
}


@dataclass
class Choice:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass(frozen=True)
class Tiny:
    model_dir: str
    model: torch.nn.Module
    hf_config: dict


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    d = write_tiny_llama(tmp_path_factory.mktemp("engine") / "tiny")
    return Tiny(str(d), load_model(d), read_hf_config(d))


def make_engine(tiny: Tiny, **kwargs) -> Engine:
    options = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    options.update(kwargs)
    config = EngineConfig.from_kwargs(model=tiny.model_dir, **options)
    return Engine.from_model(tiny.model, resolve(config, tiny.model_dir, read_hf_config(tiny.model_dir)))


def collect(engine: Engine, deltas, into: dict[tuple[str, int], Choice]) -> None:
    for d in deltas:
        c = into.setdefault((d.request_id, d.index), Choice())
        assert c.finish_reason is None, f"delta after the end of {d.request_id}/{d.index}"
        c.token_ids.extend(d.token_ids)
        c.logprobs.extend(d.logprobs)
        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason


def run(engine: Engine, out: dict | None = None, max_steps: int = 500) -> dict[tuple[str, int], Choice]:
    """Step until idle, accumulating into ``out`` (a new dict by default)."""
    out = {} if out is None else out
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return out
        collect(engine, engine.step(), out)
    raise AssertionError(f"engine still busy after {max_steps} steps")


def generate(engine: Engine, prompts: dict[str, list[int]], params: SamplingParams = GREEDY):
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, params)
    return run(engine)


def assert_all_blocks_free(engine: Engine) -> None:
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.config.num_blocks
    pool = engine.kv.pool
    assert all(pool.ref_count(b) == 0 for b in range(pool.num_blocks))


@pytest.fixture(scope="module")
def reference(tiny) -> dict[str, list[int]]:
    """Greedy tokens of each prompt run alone on a roomy engine."""
    out = {}
    for rid, prompt in PROMPTS.items():
        result = generate(make_engine(tiny), {rid: prompt})
        assert result[(rid, 0)].finish_reason == "length"
        out[rid] = result[(rid, 0)].token_ids
    assert len({tuple(t) for t in out.values()}) == len(out), "prompts should not all agree"
    return out


# -- batching invariance ------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"max_prefill_chunk": 3},
        {"max_num_batched_tokens": 7},
        {"enable_prefix_caching": False},
        {"num_blocks": 10},  # 4 requests of up to 29 tokens in 40 slots: preemption
        {"num_blocks": 10, "enable_prefix_caching": False, "max_prefill_chunk": 2},
        {"max_num_seqs": 1, "block_size": 1, "num_blocks": 40},
    ],
    ids=[
        "batch", "chunk3", "budget7", "no-prefix-cache", "preempt", "preempt-nocache-chunk2", "one-seq"
    ],
)
def test_greedy_output_is_the_same_in_every_batching_mode(tiny, reference, options):
    engine = make_engine(tiny, **options)
    result = generate(engine, PROMPTS)
    assert {rid: result[(rid, 0)].token_ids for rid in PROMPTS} == reference
    assert all(result[(rid, 0)].finish_reason == "length" for rid in PROMPTS)
    if options.get("num_blocks") == 10:
        assert engine.stats().num_preemptions > 0
    assert_all_blocks_free(engine)


@pytest.mark.parametrize(
    "num_blocks,budget,tokens",
    [(64, 64, 64), (10, 64, 40), (400, 1200, 1200)],
    ids=["budget", "capped-by-the-cache", "longer-than-the-model's-positions"],  # the tiny model has 512
)
def test_an_engine_starts_with_one_dummy_step_of_its_token_budget_and_a_clean_slate(
    tiny, reference, monkeypatch, num_blocks, budget, tokens
):
    """The warm-up step runs the model once on ``max_num_batched_tokens`` tokens (no more than the
    cache holds) and leaves nothing behind: no request, every block free, no stats; what it
    wrote in free blocks changes no output: the same prompts right after it give ``reference``,
    which test_matches_transformers_greedy holds against transformers."""
    seen = []
    forward = type(tiny.model).forward

    def counting(self, input_ids, *args, **kwargs):
        seen.append(input_ids.numel())
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(tiny.model), "forward", counting)
    engine = make_engine(tiny, num_blocks=num_blocks, max_num_batched_tokens=budget)
    assert seen == [tokens]
    assert_all_blocks_free(engine)
    stats = engine.stats()
    assert (stats.num_preemptions, stats.prefix_cache_queried_tokens, stats.prefix_cache_hit_tokens) == (0, 0, 0)
    result = generate(engine, PROMPTS)
    assert {rid: result[(rid, 0)].token_ids for rid in PROMPTS} == reference


def test_prefix_cache_hits_do_not_change_output(tiny, reference):
    engine = make_engine(tiny)
    generate(engine, {"first": PROMPTS["p13"]})
    result = generate(engine, {"again": PROMPTS["p13"], "p5": PROMPTS["p5"]})
    assert result[("again", 0)].token_ids == reference["p13"]
    assert result[("p5", 0)].token_ids == reference["p5"]
    stats = engine.stats()
    assert stats.prefix_cache_hit_tokens == 16  # 3 full blocks of p13, then 1 of p5 (its prefix)


def test_matches_transformers_greedy(tiny, reference):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny.model_dir, dtype=torch.float32)
    for rid in ("p5", "p17"):
        ids = torch.tensor([PROMPTS[rid]])
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=2,
            )
        assert out[0, ids.shape[1] :].tolist() == reference[rid], rid


# -- n > 1 --------------------------------------------------------------------------------


def test_n3_seeded_sampling_is_reproducible_and_choices_differ(tiny):
    params = SamplingParams(n=3, temperature=3.0, seed=1234, max_tokens=20, ignore_eos=True)
    alone = generate(make_engine(tiny), {"s": PROMPTS["p9"]}, params)
    engine = make_engine(tiny, max_prefill_chunk=4)
    engine.add_request("other", PROMPTS["p13"], GREEDY)
    batched = generate(engine, {"s": PROMPTS["p9"]}, params)

    choices = [alone[("s", i)] for i in range(3)]
    assert sorted(k for k in alone) == [("s", 0), ("s", 1), ("s", 2)]
    assert all(len(c.token_ids) == 20 and c.finish_reason == "length" for c in choices)
    assert len({tuple(c.token_ids) for c in choices}) == 3
    assert [batched[("s", i)].token_ids for i in range(3)] == [c.token_ids for c in choices]
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("options", [{}, {"max_prefill_chunk": 3}], ids=["one-chunk", "chunk3"])
def test_n2_greedy_choices_are_identical(tiny, reference, options):
    engine = make_engine(tiny, **options)
    params = SamplingParams(n=2, temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    result = generate(engine, {"g": PROMPTS["p13"]}, params)
    assert result[("g", 0)].token_ids == result[("g", 1)].token_ids == reference["p13"]
    assert_all_blocks_free(engine)


# -- stopping and logprobs ------------------------------------------------------------------


def test_stop_token_id_stops_with_its_id_as_stop_reason(tiny):
    base = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    full = generate(make_engine(tiny), {"r": PROMPTS["p9"]}, base)[("r", 0)].token_ids
    k = next(i for i in range(2, NEW_TOKENS) if full[i] not in full[:i])
    params = SamplingParams(
        temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, stop_token_ids=[full[k]]
    )
    engine = make_engine(tiny)
    choice = generate(engine, {"r": PROMPTS["p9"]}, params)[("r", 0)]
    assert choice.token_ids == full[: k + 1]
    assert (choice.finish_reason, choice.stop_reason) == ("stop", full[k])
    assert_all_blocks_free(engine)


def test_max_tokens_finishes_with_length(tiny, reference):
    params = SamplingParams(temperature=0.0, max_tokens=5, min_tokens=5)
    choice = generate(make_engine(tiny), {"r": PROMPTS["p5"]}, params)[("r", 0)]
    assert choice.token_ids == reference["p5"][:5]
    assert (choice.finish_reason, choice.stop_reason) == ("length", None)


def test_logprobs_only_when_asked(tiny, reference):
    asked = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=3)
    engine = make_engine(tiny)
    engine.add_request("plain", PROMPTS["p5"], GREEDY)
    result = generate(engine, {"lp": PROMPTS["p9"]}, asked)
    assert result[("plain", 0)].logprobs == []
    choice = result[("lp", 0)]
    assert choice.token_ids == reference["p9"]
    assert [lp.token_id for lp in choice.logprobs] == choice.token_ids
    for lp in choice.logprobs:
        assert len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0][0] == lp.token_id  # greedy picks the top token
        assert lp.logprob == pytest.approx(lp.top_logprobs[0][1])
        assert lp.top_logprobs[0][1] >= lp.top_logprobs[1][1] >= lp.top_logprobs[2][1]
        assert lp.logprob <= 0.0


# -- abort --------------------------------------------------------------------------------


def test_abort_mid_generation_frees_blocks_and_leaves_others_alone(tiny, reference):
    engine = make_engine(tiny)
    for rid in ("p5", "p9", "p17"):
        engine.add_request(rid, PROMPTS[rid], GREEDY)
    out: dict[tuple[str, int], Choice] = {}
    for _ in range(4):
        collect(engine, engine.step(), out)
    victim = engine.scheduler.requests["p9"]
    assert victim.status is RequestStatus.RUNNING
    num_held = len(victim.block_ids)
    num_free = engine.kv.num_free_blocks
    assert num_held > 0

    engine.abort_request("p9")
    assert engine.kv.num_free_blocks == num_free + num_held
    assert victim.status is RequestStatus.FINISHED_ABORTED and victim.block_ids == []
    assert "p9" not in engine.scheduler.requests
    assert engine.stats().num_running == 2

    run(engine, out)
    assert out[("p9", 0)].token_ids == reference["p9"][:4]
    assert out[("p9", 0)].finish_reason is None  # aborting by the caller sends no delta
    assert out[("p5", 0)].token_ids == reference["p5"]
    assert out[("p17", 0)].token_ids == reference["p17"]
    assert_all_blocks_free(engine)


def test_abort_of_an_n3_request_aborts_every_choice(tiny):
    engine = make_engine(tiny)
    engine.add_request("s", PROMPTS["p9"], SamplingParams(n=3, seed=1, max_tokens=20, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats().num_running == 3
    engine.abort_request("s")
    assert_all_blocks_free(engine)
    engine.abort_request("s")  # unknown by now: ignored


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], {}, r"prompt must contain at least 1 token, got 0"),
        ([5, 96], {}, r"prompt token 1 is 96; token ids must be integers in \[0, 96\)"),
        ([5, -1], {}, r"prompt token 1 is -1"),
        ([5] * 10, {"max_tokens": 60}, r"max_tokens is too large: 60.*64 tokens.*10 input tokens"),
        ([5] * 10, {"max_tokens": 30}, r"needs 10 KV blocks .* whole cache has 8"),
        ([5], {"n": 5}, r"n is too large: 5.* 4 sequences"),
        ([5], {"stop_token_ids": [100]}, r"stop_token_ids .* \[100\]; the vocabulary size is 96"),
        ([5], {"logit_bias": {96: 1.0}}, r"logit_bias .* \[96\]"),
    ],
    ids=["empty", "oov", "negative", "too-long", "too-many-blocks", "n", "stop-oov", "bias-oov"],
)
def test_bad_request_is_rejected_and_engine_still_serves(tiny, reference, prompt, params, match):
    engine = make_engine(tiny, num_blocks=8, max_model_len=64, max_num_seqs=4)
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", prompt, SamplingParams(**params))
    assert not engine.has_unfinished_requests()
    result = generate(engine, {"good": PROMPTS["p5"]})
    assert result[("good", 0)].token_ids == reference["p5"]
    assert_all_blocks_free(engine)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"temperature": -1.0}, r"temperature must be finite and >= 0, got -1.0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"max_tokens": 0}, r"max_tokens must be >= 1, got 0"),
        ({"n": 0}, r"n must be in \[1, 128\], got 0"),
        ({"min_tokens": 5, "max_tokens": 2}, r"min_tokens must be >= 0 and <= max_tokens=2, got 5"),
    ],
)
def test_bad_sampling_params_are_rejected(params, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**params)


def test_duplicate_request_id_is_rejected_and_the_first_is_unharmed(tiny, reference):
    engine = make_engine(tiny)
    engine.add_request("x", PROMPTS["p5"], GREEDY)
    with pytest.raises(ValueError, match=r"request_id 'x' is already in use"):
        engine.add_request("x", PROMPTS["p9"], GREEDY)
    result = run(engine)
    assert list(result) == [("x", 0)]
    assert result[("x", 0)].token_ids == reference["p5"]
    assert_all_blocks_free(engine)


# -- a failing forward pass ----------------------------------------------------------------


def fail_next_forward(monkeypatch, model) -> None:
    original = model.forward
    calls = []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected forward failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)


def test_forward_exception_fails_that_steps_requests_and_engine_recovers(tiny, reference, monkeypatch):
    engine = make_engine(tiny)
    engine.add_request("a", PROMPTS["p5"], GREEDY)
    engine.add_request("b", PROMPTS["p9"], GREEDY)
    engine.step()
    engine.step()
    fail_next_forward(monkeypatch, engine.runner.executor.model)
    deltas = engine.step()
    assert sorted((d.request_id, d.finish_reason, d.token_ids) for d in deltas) == [
        ("a", "error", ()),
        ("b", "error", ()),
    ]
    assert_all_blocks_free(engine)
    assert {d.error for d in deltas} == {"injected forward failure"}

    result = generate(engine, {"c": PROMPTS["p13"]})
    assert result[("c", 0)].token_ids == reference["p13"]
    assert_all_blocks_free(engine)


def test_forward_exception_in_the_fork_step_fails_every_choice(tiny, monkeypatch):
    engine = make_engine(tiny)
    engine.add_request("s", PROMPTS["p9"], SamplingParams(n=3, seed=1, max_tokens=5))
    fail_next_forward(monkeypatch, engine.runner.executor.model)
    deltas = engine.step()
    assert sorted((d.index, d.finish_reason) for d in deltas) == [(i, "error") for i in range(3)]
    assert_all_blocks_free(engine)


def test_failed_step_drops_the_prefix_cache_so_garbage_blocks_are_never_hit(tiny, reference, monkeypatch):
    # The first step registers the prompt's full blocks as cached before the forward pass
    # runs; when that pass fails the blocks hold garbage and must not be hit later.
    engine = make_engine(tiny)
    engine.add_request("a", PROMPTS["p13"], GREEDY)
    fail_next_forward(monkeypatch, engine.runner.executor.model)
    assert [d.finish_reason for d in engine.step()] == ["error"]
    assert len(engine.kv.pool.cached_blocks) == 0
    assert_all_blocks_free(engine)

    result = generate(engine, {"again": PROMPTS["p13"]})
    assert result[("again", 0)].token_ids == reference["p13"]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_every_attention_backend_gives_the_reference_tokens(tiny, reference, backend):
    engine = make_engine(tiny, attention_backend=backend)
    assert engine.config.attention_backend == backend
    result = generate(engine, {name: PROMPTS[name] for name in ("p5", "p9", "p13")})
    for name in ("p5", "p9", "p13"):
        assert result[(name, 0)].token_ids == reference[name]


# -- steps in flight (pipeline micro-batches) ----------------------------------------------


class DeferredExecutor(LocalExecutor):
    """Takes ``depth`` steps at once and runs each only when someone waits for it (in
    submission order, as pipeline stages do), so the engine really overlaps its steps."""

    def __init__(self, shard, depth: int) -> None:
        super().__init__(shard)
        self.max_in_flight = depth
        self.queue: list = []  # [delta, outcome or None]
        self.max_seen_in_flight = 0

    def submit(self, delta):
        entry = [delta, None]
        self.queue.append(entry)
        self.max_seen_in_flight = max(self.max_seen_in_flight, sum(e[1] is None for e in self.queue))
        return self._Handle(self, entry)

    class _Handle:
        def __init__(self, executor, entry) -> None:
            self.executor, self.entry = executor, entry

        def result(self):
            ex = self.executor
            while self.entry[1] is None:
                head = ex.queue.pop(0)
                head[1] = LocalExecutor.submit(ex, head[0])
            return self.entry[1].result()


def make_pipelined_engine(tiny: Tiny, depth: int, **kwargs) -> Engine:
    engine = make_engine(tiny, **kwargs)
    local = engine.runner.executor
    engine.runner.executor = DeferredExecutor(local.shard, depth)
    engine._depth = depth
    return engine


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("options", [{}, {"num_blocks": 10}, {"max_prefill_chunk": 3}], ids=["batch", "preempt", "chunk3"])
def test_steps_in_flight_give_the_same_greedy_output(tiny, reference, depth, options):
    engine = make_pipelined_engine(tiny, depth, **options)
    result = generate(engine, PROMPTS)
    assert {rid: result[(rid, 0)].token_ids for rid in PROMPTS} == reference
    assert engine.runner.executor.max_seen_in_flight >= 2  # steps really overlapped
    if options.get("num_blocks") == 10:
        assert engine.stats().num_preemptions > 0
    assert_all_blocks_free(engine)


def test_abort_of_a_request_in_flight_frees_its_blocks_and_sends_nothing_more(tiny, reference):
    engine = make_pipelined_engine(tiny, 2)
    for rid in ("p5", "p9", "p17"):
        engine.add_request(rid, PROMPTS[rid], GREEDY)
    out: dict[tuple[str, int], Choice] = {}
    for _ in range(4):
        collect(engine, engine.step(), out)
    in_flight = {c.request.request_id for plan, _ in engine._in_flight for c in plan.chunks}
    victim = next(iter(in_flight))
    engine.abort_request(victim)
    assert victim not in engine.scheduler.requests
    run(engine, out)
    assert out[(victim, 0)].finish_reason is None
    assert out[(victim, 0)].token_ids == reference[victim][: len(out[(victim, 0)].token_ids)]
    for rid in {"p5", "p9", "p17"} - {victim}:
        assert out[(rid, 0)].token_ids == reference[rid]
    assert_all_blocks_free(engine)


def test_a_failed_step_with_another_in_flight_fails_both_and_the_engine_recovers(tiny, reference, monkeypatch):
    engine = make_pipelined_engine(tiny, 2)
    for rid in ("p5", "p9", "p17"):
        engine.add_request(rid, PROMPTS[rid], GREEDY)
    engine.step()
    engine.step()
    fail_next_forward(monkeypatch, engine.runner.executor.model)
    deltas = engine.step()
    assert sorted((d.request_id, d.finish_reason) for d in deltas) == [
        ("p17", "error"), ("p5", "error"), ("p9", "error")
    ]
    assert not engine._in_flight
    assert_all_blocks_free(engine)
    result = generate(engine, {"c": PROMPTS["p13"]})
    assert result[("c", 0)].token_ids == reference["p13"]


def test_a_step_that_cannot_even_be_submitted_fails_its_requests_and_the_engine_recovers(tiny, reference, monkeypatch):
    engine = make_engine(tiny)
    engine.add_request("a", PROMPTS["p5"], GREEDY)
    real_submit = engine.runner.executor.submit
    calls = []

    def submit(delta):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the executor is shut down")
        return real_submit(delta)

    monkeypatch.setattr(engine.runner.executor, "submit", submit)
    engine.step()
    deltas = engine.step()
    assert [(d.request_id, d.finish_reason, d.error) for d in deltas] == [("a", "error", "the executor is shut down")]
    assert_all_blocks_free(engine)
    result = generate(engine, {"c": PROMPTS["p13"]})
    assert result[("c", 0)].token_ids == reference["p13"]


# -- a request resumed with the tokens it already generated (migrated off a dead replica) ----


@pytest.mark.parametrize("done", [1, 5, NEW_TOKENS - 1])
def test_a_resumed_request_goes_on_exactly_where_it_stopped(tiny, reference, done):
    engine = make_engine(tiny)
    request = check_request("p9-resumed", PROMPTS["p9"], GREEDY, engine.limits, reference["p9"][:done])
    engine.add(request)
    result = run(engine)
    choice = result[("p9-resumed", 0)]
    assert choice.token_ids == reference["p9"][done:]  # only the new tokens come back
    assert choice.finish_reason == "length"


def test_a_resumed_request_must_leave_something_to_generate(tiny, reference):
    engine = make_engine(tiny)
    with pytest.raises(ValueError, match="output tokens must be token ids .* fewer than max_tokens="):
        check_request("full", PROMPTS["p9"], GREEDY, engine.limits, reference["p9"])


def test_pending_prefill_tokens_count_what_is_left_to_prefill(tiny):
    """The router's queue signal: every prompt token not yet prefilled, none for decodes."""
    # First come, first served: a (the longer prompt) is prefilled before b.
    engine = make_engine(tiny, max_num_batched_tokens=8, enable_prefix_caching=False, queue_order_s_per_token=0)
    engine.add_request("a", list(range(20, 33)), GREEDY)  # 13 tokens
    engine.add_request("b", PROMPTS["p5"], GREEDY)
    assert engine.stats().num_pending_prefill_tokens == 13 + 5
    engine.step()  # 8 of a's 13 tokens
    assert engine.stats().num_pending_prefill_tokens == 5 + 5
    engine.step()  # a's last 5 (it samples), then 3 of b's 5
    assert engine.stats().num_pending_prefill_tokens == 2
    engine.step()  # a decodes, b's last 2: nothing left to prefill
    assert engine.stats().num_pending_prefill_tokens == 0
    engine.abort_request("a")
    engine.add_request("c", PROMPTS["p9"], GREEDY)
    assert engine.stats().num_pending_prefill_tokens == 9


def test_pending_prefill_tokens_deduct_a_waiting_request_s_cache_hits(tiny):
    engine = make_engine(tiny)  # block size 4
    generate(engine, {"first": PROMPTS["p13"]})
    # p13 again: its 3 leading full blocks are cached (never the block of its last token).
    engine.add_request("again", PROMPTS["p13"], GREEDY)
    assert engine.stats().num_pending_prefill_tokens == 13 - 12
    engine.add_request("p5", PROMPTS["p5"], GREEDY)  # shares 4 tokens with p13: one block
    assert engine.stats().num_pending_prefill_tokens == 1 + (5 - 4)


def test_a_failed_step_leaves_no_pending_prefill_behind(tiny, monkeypatch):
    engine = make_engine(tiny, max_num_batched_tokens=8)
    engine.add_request("a", list(range(20, 33)), GREEDY)  # 13 tokens: 5 still to prefill after a step
    fail_next_forward(monkeypatch, engine.runner.executor.model)
    assert [d.finish_reason for d in engine.step()] == ["error"]
    assert engine.stats().num_pending_prefill_tokens == 0
