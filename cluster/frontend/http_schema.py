"""The OpenAI-compatible request bodies, and parsing a body into one without ever a 500.

The sampling fields are derived from ``SamplingParams`` itself: every field of it is a body
field of the same name (optional; unset takes the engine's default), except the few whose
OpenAI shape differs (``HTTP_SHAPES``). A test fails when the two drift.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from kvtide.cluster.frontend.errors import invalid
from kvtide.workers import SamplingParams

HTTP_SHAPES: dict[str, Any] = {
    "stop": str | list[str],  # OpenAI takes one stop string or a list
    "logit_bias": dict[str, float],  # JSON object keys are strings; they must name token ids
}
PER_ENDPOINT = ("logprobs",)
"""Completions take ``logprobs: int``; chat takes ``logprobs: bool`` plus ``top_logprobs``."""


def _sampling_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(SamplingParams)
    fields = {}
    for f in dataclasses.fields(SamplingParams):
        if f.name in PER_ENDPOINT:
            continue
        shape = HTTP_SHAPES.get(f.name, hints[f.name])
        fields[f.name] = (Optional[shape], None)  # noqa: UP045 - create_model needs a runtime type
    return fields


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints take that are not sampling fields. Unknown fields are ignored, as
    OpenAI's own API does."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


SamplingBody = create_model("SamplingBody", __base__=_Common, **_sampling_fields())


def sampling_kwargs(body: BaseModel, logprobs: int | None) -> dict[str, Any]:
    """The ``SamplingParams`` keyword arguments a body set."""
    out = {k: v for k in _sampling_fields() if (v := getattr(body, k)) is not None}
    if isinstance(out.get("stop"), str):
        out["stop"] = (out["stop"],)
    if "logit_bias" in out:
        try:
            out["logit_bias"] = {int(k): v for k, v in out["logit_bias"].items()}
        except ValueError as exc:
            raise invalid(f"logit_bias keys must be token ids: {exc}") from exc
    if logprobs is not None:
        out["logprobs"] = logprobs
    return out


class CompletionBody(SamplingBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(SamplingBody):
    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class _HugeInt:
    """An integer literal past Python's int-string limit: kept as a marker so that validation
    names the field that held it, instead of the parser failing the whole body."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def _parse_int(text: str) -> int | _HugeInt:
    digits = len(text.lstrip("-"))
    return _HugeInt(digits) if digits > sys.get_int_max_str_digits() else int(text)


def parse_body(model: type[BaseModel], raw: bytes):
    """The body as ``model``; raises ServingError(INVALID_ARGUMENT) naming what is wrong."""
    try:
        data = json.loads(raw, parse_int=_parse_int)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise invalid("the request body nests deeper than this server parses (about 1,000 levels)") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(describe(exc.errors())) from exc
    except RecursionError:
        raise invalid("the request body nests deeper than this server validates (about 1,000 levels)") from None


def describe(errors) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in errors)
