"""The HTTP API's edges without Ray: auth, body limits, validation and error shapes.

A gateway with a word-level tokenizer and no replicas: every request that passes validation
reaches routing and gets 503, so each rejection below is proven to happen before it.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from kvtide.cluster.frontend.errors import Code, ServingError
from kvtide.cluster.frontend.grpc_api import sampling_kwargs
from kvtide.cluster.frontend.http_api import create_app
from kvtide.cluster.frontend.http_render import merged
from kvtide.cluster.frontend.requests import ChoiceDelta, FrontendConfig, PreparedRequest, Usage, api_key_ok
from tests.unit.frontend_fakes import KEY, make_gateway
from kvtide.proto import kvtide_pb2
from kvtide.workers import EngineRequest, SamplingParams

_gateway = make_gateway


def _request(gateway, method: str, path: str, key: str | None = KEY, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        transport = httpx.ASGITransport(app=create_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, headers=headers, **kwargs)

    return asyncio.run(go())


def test_api_key_check():
    assert api_key_ok(None, ())  # auth off
    assert api_key_ok("Bearer b", ("a", "b"))
    for presented in (None, "", "b", "Bearer ", "Bearer bb", "bearer b", "Basic b"):
        assert not api_key_ok(presented, ("a", "b")), presented


def test_every_route_but_health_needs_the_key():
    gw = _gateway()
    for key in (None, "wrong"):
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")):
            r = _request(gw, method, path, key=key)
            assert r.status_code == 401, (path, key)
            assert "Bearer" in r.json()["error"]["message"]
    assert _request(gw, "GET", "/health", key=None).status_code == 200
    assert _request(gw, "GET", "/v1/models").json()["data"][0]["id"] == "tiny"
    assert b"kvtide:time_to_first_token_seconds" in _request(gw, "GET", "/metrics").content


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"prompt": "hello", "temperature": -1}, 400, "temperature must be finite and >= 0, got -1.0"),
        ({"prompt": "hello", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": "hello", "max_tokens": 8}, 400, "max_tokens is too large: 8"),
        ({"prompt": "hello"}, 400, "max_tokens was not sent; /v1/completions defaults it to 16"),
        ({"prompt": "hello " * 8}, 400, "maximum context length is 8 tokens"),
        ({"prompt": "hello", "model": "gpt-9"}, 404, "'gpt-9' does not exist"),
        ({"prompt": [1, 99]}, 400, "prompt token 1 is 99"),
        ({"prompt": "hello", "logit_bias": {"x": 1}}, 400, "logit_bias"),
        ({"prompt": "hello", "echo": True}, 400, "echo=true is not supported"),
        ({"prompt": "hello", "max_tokens": 2}, 503, "no replica can serve the request"),
    ],
)
def test_completion_rejections(body, status, needle):
    r = _request(_gateway(), "POST", "/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["code"] == status


def test_chat_renders_the_template_before_routing():
    r = _request(_gateway(), "POST", "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and "at least 1 message" in r.json()["error"]["message"]
    ok = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}], "max_tokens": 1}
    assert _request(_gateway(), "POST", "/v1/chat/completions", json=ok).status_code == 503
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    r = _request(_gateway(), "POST", "/v1/chat/completions", json=image)
    assert r.status_code == 400 and "'image_url'" in r.json()["error"]["message"]


def test_chat_errors_name_the_fields_the_client_sent():
    hello = [{"role": "user", "content": "hello"}]
    r = _request(_gateway(), "POST", "/v1/chat/completions", json={"messages": hello, "max_completion_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["message"] == "max_completion_tokens must be >= 1, got 0"
    body = {"messages": hello, "logprobs": True, "top_logprobs": 50}
    r = _request(_gateway(), "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("top_logprobs must be in [0, 20]")


def test_body_limits_and_garbage():
    gw = _gateway()
    r = _request(gw, "POST", "/v1/completions", content=b"{" + b" " * 2000 + b"}")
    assert r.status_code == 413 and "the limit is 1000 bytes" in r.json()["error"]["message"]
    r = _request(gw, "POST", "/v1/completions", content=b"\x00\xff not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_draining_refuses_with_503_and_health_says_so():
    gw = _gateway()
    gw.admission.draining = True
    assert _request(gw, "GET", "/health", key=None).status_code == 503
    r = _request(gw, "POST", "/v1/completions", json={"prompt": "hello", "max_tokens": 1})
    assert r.status_code == 503 and "draining" in r.json()["error"]["message"]


def test_proto_sampling_params_pass_only_the_fields_set():
    assert sampling_kwargs(kvtide_pb2.SamplingParams()) == {}
    params = kvtide_pb2.SamplingParams(temperature=0.0, max_tokens=3, stop=["\n"], logit_bias={5: -1.0})
    params.bad_words_token_ids.add(ids=[1, 2])
    assert sampling_kwargs(params) == {
        "temperature": 0.0, "max_tokens": 3, "stop": ("\n",), "logit_bias": {5: -1.0}, "bad_words_token_ids": ((1, 2),)
    }


@pytest.mark.parametrize(
    ("prompt", "needle"),
    [
        ([], "at least 1 token"),
        (["hello", "hello " * 8], "prompt[1]: This model's maximum context length is 8 tokens"),
        ([[1, 2], [3, 99]], "prompt[1]: prompt token 1 is 99"),
        (["hello"] * 5, "a list of 5 prompts; the limit is 4 per request"),
    ],
)
def test_batched_prompts_are_all_checked_before_any_runs(prompt, needle):
    r = _request(_gateway(max_prompts_per_request=4), "POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


class _FakeGateway:
    """``generate`` streams two choices of one token each per prompt; prompt ``fail`` fails
    after its first delta. Records which streams were closed."""

    def __init__(self, fail: int | None = None) -> None:
        self.fail = fail
        self.closed: list[int] = []

    async def generate(self, request):
        i = request.request.prompt_token_ids[0]
        try:
            for j in range(2):
                await asyncio.sleep(0.01 * (i + 1))
                if i == self.fail and j == 1:
                    raise ServingError(Code.UNAVAILABLE, f"replica of prompt {i} died")
                usage = Usage(10 + i, 2, i) if j == 1 else None
                yield ChoiceDelta(j, (i,), f"p{i}c{j}", (), "length", None, "r", usage)
            await asyncio.sleep(10 if i == 0 and self.fail is not None else 0)
        finally:
            self.closed.append(i)


def _prepared(i: int) -> PreparedRequest:
    return PreparedRequest(EngineRequest(f"r{i}", (i,), SamplingParams(n=2, max_tokens=1)))


def test_batched_prompts_stream_as_openai_numbers_the_choices():
    async def go():
        return [d async for d in merged(_FakeGateway(), [_prepared(i) for i in range(3)])]

    deltas = asyncio.run(go())
    assert sorted((d.index, d.text) for d in deltas) == [(i * 2 + j, f"p{i}c{j}") for i in range(3) for j in range(2)]
    assert [d.usage for d in deltas[:-1]] == [None] * 5
    assert deltas[-1].usage == Usage(10 + 11 + 12, 6, 0 + 1 + 2)


def test_one_failing_prompt_fails_the_batch_and_closes_the_others():
    gw = _FakeGateway(fail=1)

    async def go():
        return [d async for d in merged(gw, [_prepared(i) for i in range(3)])]

    with pytest.raises(ServingError, match=r"^prompt\[1\]: replica of prompt 1 died"):
        asyncio.run(go())
    assert sorted(gw.closed) == [0, 1, 2]


def test_request_timeout_bounds_the_wait_for_admission():
    gw = _gateway(max_in_flight=1, request_timeout_s=0.2)

    async def go():
        await gw.admission._slots.acquire()  # another request holds the only slot
        request = await gw.prepare("hello", {"max_tokens": 1})
        with pytest.raises(ServingError) as err:
            async for _ in gw.generate(request):
                pass
        # the waiter left, the slot is still the holder's
        assert gw.admission.num_queued == 0 and gw.admission._slots.locked()
        return err.value

    error = asyncio.run(go())
    assert error.code == Code.DEADLINE_EXCEEDED
    assert "request timeout of 0.2 s while waiting for admission (request_timeout_s=0.2)" in error.message
    with pytest.raises(ValueError, match="request_timeout_s must be > 0"):
        FrontendConfig(request_timeout_s=0)
