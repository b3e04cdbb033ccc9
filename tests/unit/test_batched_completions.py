"""A batched completions request (several prompts, one response) counts every prompt as
finished with its finish reason, none as aborted: the merged stream lets each prompt's
stream end on its own once every usage arrived (issue 15, item 5)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from kvtide.cluster.frontend.http_api import create_app
from tests.unit.frontend_fakes import KEY, FakeReplica, FakeStream, routed_gateway

PROMPTS = ["hello", "world", "tide", "the end"]


class TailStream(FakeStream):
    """Ends a moment after its last delta, as a Ray stream does: its end is a message of its own."""

    async def __anext__(self):
        try:
            return await super().__anext__()
        except StopAsyncIteration:
            await asyncio.sleep(0.01)
            raise


class TailReplica(FakeReplica):
    def generate(self, request) -> TailStream:
        self.started.append(request.request_id)
        self.requests.append(request)
        return TailStream(self, request)


def success(gateway, reason: str) -> float:
    prefix = f'kvtide:request_success_total{{finished_reason="{reason}"}} '
    lines = [line for line in gateway.metrics.render().decode().splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


@pytest.mark.parametrize("stream", [False, True])
def test_every_prompt_of_a_batch_counts_as_finished_not_aborted(stream):
    replicas = [TailReplica("r0", tokens=(1, 2, 3), delay_s=0.0), TailReplica("r1", tokens=(1, 2, 3), delay_s=0.0)]
    gateway, _, _ = routed_gateway(*replicas)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            body = {"prompt": PROMPTS, "max_tokens": 3, "stream": stream}
            return await client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})

    r = asyncio.run(go())
    assert r.status_code == 200, r.text
    if not stream:
        assert sorted(c["index"] for c in r.json()["choices"]) == list(range(len(PROMPTS)))
        assert {c["finish_reason"] for c in r.json()["choices"]} == {"length"}
    assert sum(len(rep.started) for rep in replicas) == len(PROMPTS)
    assert (success(gateway, "length"), success(gateway, "abort")) == (len(PROMPTS), 0)
    assert [rep.aborted for rep in replicas] == [[], []]  # no stream was closed early
