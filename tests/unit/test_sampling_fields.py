"""The sampling fields are declared once, in ``SamplingParams``; the proto message and the
HTTP bodies carry exactly them. Adding a field in one place only fails here."""

from __future__ import annotations

import dataclasses

from kvtide.cluster.frontend.grpc_api import sampling_kwargs
from kvtide.cluster.frontend.http_schema import ChatBody, CompletionBody, SamplingBody, sampling_kwargs as http_kwargs
from kvtide.proto import kvtide_pb2
from kvtide.workers import SamplingParams

FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
# OpenAI's names around the shared ones: chat's logprobs is a bool plus top_logprobs, and its
# output cap may be sent as max_completion_tokens; neither is a SamplingParams field.
CHAT_ONLY = {"top_logprobs", "max_completion_tokens"}
NOT_SAMPLING = {"model", "stream", "stream_options"}


def test_the_proto_message_has_exactly_the_sampling_fields():
    assert set(kvtide_pb2.SamplingParams.DESCRIPTOR.fields_by_name) == FIELDS


def test_the_http_bodies_have_exactly_the_sampling_fields():
    assert set(SamplingBody.model_fields) - NOT_SAMPLING == FIELDS - {"logprobs"}
    assert set(CompletionBody.model_fields) - NOT_SAMPLING - {"prompt", "echo"} == FIELDS
    assert set(ChatBody.model_fields) - NOT_SAMPLING - {"messages"} - CHAT_ONLY == FIELDS


def test_every_field_set_over_either_api_reaches_sampling_params_unchanged():
    values = {
        "n": 2, "max_tokens": 9, "min_tokens": 1, "temperature": 0.5, "top_k": 3, "top_p": 0.9, "min_p": 0.05,
        "repetition_penalty": 1.1, "presence_penalty": 0.2, "frequency_penalty": -0.2, "logit_bias": {5: -1.0},
        "bad_words_token_ids": ((1, 2),), "stop": ("\n",), "stop_token_ids": (7,), "include_stop_str_in_output": True,
        "ignore_eos": True, "seed": 11, "logprobs": 2, "skip_special_tokens": False,
    }  # fmt: skip
    assert set(values) == FIELDS  # a new field needs a value here, and then must pass both APIs
    expected = SamplingParams(**values)
    proto = kvtide_pb2.SamplingParams(**{k: v for k, v in values.items() if k not in ("logit_bias", "bad_words_token_ids")})
    proto.logit_bias.update(values["logit_bias"])
    proto.bad_words_token_ids.add(ids=[1, 2])
    assert SamplingParams(**sampling_kwargs(proto)) == expected
    body = CompletionBody.model_validate(
        {**{k: v for k, v in values.items() if k != "logit_bias"}, "logit_bias": {"5": -1.0}, "prompt": "x"}
    )
    assert SamplingParams(**http_kwargs(body, body.logprobs)) == expected
