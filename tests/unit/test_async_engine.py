"""AsyncEngine over a tiny engine: concurrent streams, cancellation and early exit abort,
bad input fails before anything is queued. Each test runs its own ``asyncio.run``."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvtide.workers import EngineRequest
from kvtide.workers.async_engine import AsyncEngine, EngineDeadError
from kvtide.workers.config import EngineConfig, resolve
from kvtide.workers.engine import Engine
from kvtide.workers.model_loader import load_model, read_hf_config
from kvtide.workers.request import Request, RequestStatus
from kvtide.workers.sampling_params import SamplingParams
from tests.tiny import write_tiny_llama

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=10)
# Long enough that a request cannot finish by itself within the abort wait.
LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
PROMPTS = {
    "a": [5, 17, 33, 41, 60],
    "b": [7, 7, 8, 90, 12, 13, 40, 41, 3],
    "c": [11, 12, 13],
}
ABORT_WAIT_S = 2.0


def _req(request_id: str, prompt, params) -> EngineRequest:
    return EngineRequest(request_id, tuple(prompt), params)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = write_tiny_llama(tmp_path_factory.mktemp("async") / "tiny")
    return str(d), load_model(d)


def make_engine(tiny) -> Engine:
    model_dir, model = tiny
    config = EngineConfig.from_kwargs(
        model=model_dir, num_blocks=128, block_size=4, max_num_seqs=8, max_num_batched_tokens=64
    )
    return Engine.from_model(model, resolve(config, model_dir, read_hf_config(model_dir)))


class Recorder:
    """Wraps an engine's ``add`` to keep every Request the stepping thread queued."""

    def __init__(self, engine: Engine, monkeypatch) -> None:
        self.added: list[Request] = []
        original = engine.add

        def add(request: EngineRequest) -> None:
            original(request)
            self.added.append(engine.scheduler.requests[request.request_id])

        monkeypatch.setattr(engine, "add", add)


@pytest.fixture
def engine(tiny) -> Engine:
    return make_engine(tiny)


@pytest.fixture
def async_engine(engine):
    ae = AsyncEngine(engine, idle_wait_s=0.05)
    yield ae
    ae.shutdown(timeout_s=5.0)
    assert not ae._thread.is_alive()


def sync_outputs(tiny, prompts, params) -> dict[tuple[str, int], list[int]]:
    engine = make_engine(tiny)
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, params)
    out: dict[tuple[str, int], list[int]] = {}
    while engine.has_unfinished_requests():
        for d in engine.step():
            out.setdefault((d.request_id, d.index), []).extend(d.token_ids)
    return out


async def consume(ae: AsyncEngine, rid: str, prompt, params) -> dict[int, tuple[list[int], str | None]]:
    out: dict[int, tuple[list[int], str | None]] = {}
    async for d in ae.generate(_req(rid, prompt, params)):
        assert d.request_id == rid
        tokens, reason = out.get(d.index, ([], None))
        assert reason is None, "delta after the choice finished"
        out[d.index] = (tokens + list(d.token_ids), d.finish_reason)
    return out


async def wait_until_idle(engine: Engine, timeout_s: float = ABORT_WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished_requests() or engine.kv.num_free_blocks != engine.config.num_blocks:
        assert time.monotonic() < deadline, "abort did not reach the engine in time"
        await asyncio.sleep(0.01)


def test_concurrent_streams_match_the_sync_engine(tiny, async_engine, engine):
    sampled = SamplingParams(n=2, temperature=1.5, seed=7, max_tokens=8, ignore_eos=True)
    expected = sync_outputs(tiny, PROMPTS, GREEDY) | sync_outputs(tiny, {"s": PROMPTS["b"]}, sampled)

    async def main():
        jobs = [consume(async_engine, rid, p, GREEDY) for rid, p in PROMPTS.items()]
        jobs.append(consume(async_engine, "s", PROMPTS["b"], sampled))
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    got = {
        (rid, index): tokens
        for rid, result in zip([*PROMPTS, "s"], results)
        for index, (tokens, _) in result.items()
    }
    assert got == expected
    assert all(reason == "length" for r in results for _, reason in r.values())
    assert not engine.has_unfinished_requests()


def test_cancelling_the_consumer_aborts_the_request(async_engine, engine, monkeypatch):
    recorder = Recorder(engine, monkeypatch)

    async def main():
        first = asyncio.Event()
        received = []

        async def consumer():
            async for d in async_engine.generate(_req("long", PROMPTS["a"], LONG)):
                received.append(d)
                first.set()

        task = asyncio.create_task(consumer())
        await asyncio.wait_for(first.wait(), timeout=ABORT_WAIT_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until_idle(engine)
        return received

    received = asyncio.run(main())
    assert received and all(d.finish_reason is None for d in received)
    (request,) = recorder.added
    assert request.status is RequestStatus.FINISHED_ABORTED
    assert request.num_output_tokens < LONG.max_tokens


def test_breaking_out_of_the_stream_aborts_the_request(async_engine, engine, monkeypatch):
    recorder = Recorder(engine, monkeypatch)

    async def main():
        count = 0
        async for _ in async_engine.generate(_req("early", PROMPTS["b"], LONG)):
            count += 1
            if count == 3:
                break
        # The dropped generator is closed by the event loop, which sends the abort.
        await wait_until_idle(engine)

    asyncio.run(main())
    (request,) = recorder.added
    assert request.status is RequestStatus.FINISHED_ABORTED
    assert request.num_output_tokens < LONG.max_tokens


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], GREEDY, r"prompt must contain at least 1 token"),
        ([5, 96], GREEDY, r"prompt token 1 is 96"),
        ([5] * 10, SamplingParams(max_tokens=510), r"max_tokens is too large: 510"),
    ],
    ids=["empty", "oov", "too-long"],
)
def test_bad_input_raises_before_anything_is_queued(
    tiny, async_engine, engine, monkeypatch, prompt, params, match
):
    recorder = Recorder(engine, monkeypatch)

    async def main():
        with pytest.raises(ValueError, match=match):
            async for _ in async_engine.generate(_req("x", prompt, params)):
                pass
        # The id was not left registered: it can be used right away.
        return await consume(async_engine, "x", PROMPTS["c"], GREEDY)

    result = asyncio.run(main())
    assert [r.request_id for r in recorder.added] == ["x"]
    assert recorder.added[0].prompt_token_ids == PROMPTS["c"]
    assert result[0][0] == sync_outputs(tiny, {"x": PROMPTS["c"]}, GREEDY)[("x", 0)]


def test_duplicate_live_request_id_is_rejected(async_engine, engine):
    async def main():
        first = async_engine.generate(_req("dup", PROMPTS["a"], LONG))
        await first.__anext__()
        with pytest.raises(ValueError, match=r"request_id 'dup' is already in use"):
            await async_engine.generate(_req("dup", PROMPTS["b"], GREEDY)).__anext__()
        await first.aclose()
        await wait_until_idle(engine)

    asyncio.run(main())


def test_shutdown_ends_open_streams_with_a_clear_error(tiny):
    async def main():
        engine = AsyncEngine(make_engine(tiny))
        stream = engine.generate(_req("r", [5, 9, 17], SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)))
        first = await stream.__anext__()
        assert first.token_ids
        engine.shutdown()
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate(_req("r", [1, 2], SamplingParams(max_tokens=1))):
                pass

    asyncio.run(asyncio.wait_for(main(), 30))


def test_aborting_one_choice_ends_it_in_the_stream_and_the_others_run_on(async_engine, engine):
    """The gateway aborts a choice whose stop string it found: the engine frees that choice
    alone, and the stream ends when the others finish (no wait for the aborted one)."""
    params = SamplingParams(n=2, temperature=0.0, max_tokens=12, ignore_eos=True)

    async def main():
        deltas = []
        async for d in async_engine.generate(_req("pair", PROMPTS["a"], params)):
            deltas.append(d)
            if len([x for x in deltas if x.index == 0]) == 2:
                async_engine.abort("pair", 0)
        return deltas

    deltas = asyncio.run(asyncio.wait_for(main(), 30))
    first = [d for d in deltas if d.index == 0]
    second = [d for d in deltas if d.index == 1]
    assert first[-1].finish_reason == "abort" and first[-1].token_ids == ()
    assert sum(len(d.token_ids) for d in first) < 12
    assert sum(len(d.token_ids) for d in second) == 12 and second[-1].finish_reason == "length"
    assert not engine.has_unfinished_requests()
