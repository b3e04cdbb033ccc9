"""Offline batch generation: ``LLM("smollm2-135m").generate(prompts, params)``.

The in-process counterpart of the frontend: it tokenizes, checks each request once, steps the
engine, and turns each choice's token ids into text with its own ``IncrementalDetokenizer``,
which also finds stop strings; a choice that hits one is aborted in the engine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtide.workers.detokenizer import IncrementalDetokenizer
from kvtide.workers.engine import Engine
from kvtide.workers.engine_request import EngineRequest, check_request
from kvtide.workers.outputs import Completion, CompletionDelta, RequestOutput
from kvtide.workers.sampler import SampledToken
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.tokenizer import Tokenizer


class StepFailedError(RuntimeError):
    """A step of the engine failed; the requests it ran got no output."""


@dataclass
class _Choice:
    detok: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[SampledToken] = field(default_factory=list)
    done: Completion | None = None

    def add(self, d: CompletionDelta) -> str | None:
        """Takes one delta; returns the stop string when this delta completed one."""
        ids, stop = d.token_ids, None
        if self.detok is not None:
            pushed_before = self.detok.num_tokens_pushed
            released = self.detok.push(ids, final=d.finished)
            self.text.append(released.text)
            if released.stop_string is not None:
                stop = released.stop_string
                ids = ids[: self.detok.num_tokens_to_stop - pushed_before]
        self.token_ids.extend(ids)
        self.logprobs.extend(d.logprobs[: len(ids)])
        if stop is not None:
            self.done = self._completion(d.index, "stop", stop)
        elif d.finished:
            self.done = self._completion(d.index, d.finish_reason, d.stop_reason)
        return stop

    def _completion(self, index: int, finish_reason: str, stop_reason) -> Completion:
        return Completion(
            index, tuple(self.token_ids), "".join(self.text), finish_reason, stop_reason, tuple(self.logprobs)
        )


class LLM:
    def __init__(self, model: str = "smollm2-135m", engine: Engine | None = None, **kwargs) -> None:
        self.engine = engine or Engine.load(model, **kwargs)
        model_dir = Path(self.engine.config.model_dir)
        self.tokenizer = Tokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").is_file() else None
        """None for a model without ``tokenizer.json``: token-id prompts only, no text out."""

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, all submitted at once; results in prompt order.
        Raises ``ValueError`` for a bad request (before any runs) and ``StepFailedError`` when
        a step fails."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        requests = [
            check_request(f"llm-{i}", self._token_ids(p), sp, self.engine.limits)
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]
        choices = {
            (r.request_id, i): _Choice(self._detok(r)) for r in requests for i in range(r.params.n)
        }
        cached: dict[str, int] = {}
        for r in requests:
            self.engine.add(r)
        while self.engine.has_unfinished_requests():
            for d in self.engine.step():
                if d.finish_reason == "error":
                    raise StepFailedError(f"request {d.request_id} failed: {d.error}")
                cached[d.request_id] = d.num_cached_tokens
                choice = choices[(d.request_id, d.index)]
                if choice.done is None and choice.add(d) is not None:
                    self.engine.abort_request(d.request_id, d.index)  # its stop string ended it
        return [
            RequestOutput(
                r.request_id,
                r.prompt_token_ids,
                tuple(choices[(r.request_id, i)].done for i in range(r.params.n)),
                cached.get(r.request_id, 0),
            )
            for r in requests
        ]

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> RequestOutput:
        """One chat run to completion: rendered by the model's chat template and tokenized as a
        chat (``chat_token_ids``)."""
        return self.generate([self.chat_token_ids(messages)], params)[0]

    def chat_token_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The prompt ids of a chat: the template's text, with one BOS at most
        (``Tokenizer.encode_chat``). Pass them to ``generate`` or ``stream``."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer.json, so no chat template; pass token ids")
        return self.tokenizer.encode_chat(self.tokenizer.apply_chat_template(messages))

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str = "stream"
    ) -> Iterator[tuple[str, int]]:
        """One request (``n`` = 1) run to completion, yielding (new text, new tokens) as each
        step releases them: what an interactive CLI prints."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"stream runs one choice; got n={params.n}")
        request = check_request(request_id, self._token_ids(prompt), params, self.engine.limits)
        choice = _Choice(self._detok(request))
        self.engine.add(request)
        while choice.done is None and self.engine.has_unfinished_requests():
            for d in self.engine.step():
                if d.finish_reason == "error":
                    raise StepFailedError(f"request {d.request_id} failed: {d.error}")
                num_text, num_tokens = len(choice.text), len(choice.token_ids)
                if choice.add(d) is not None:
                    self.engine.abort_request(d.request_id)
                yield "".join(choice.text[num_text:]), len(choice.token_ids) - num_tokens

    def _token_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer is None:
            raise ValueError("prompt is text but this model has no tokenizer.json; pass token ids")
        return self.tokenizer.encode(prompt)

    def _detok(self, request: EngineRequest) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer.for_request(self.tokenizer, request.prompt_token_ids, request.params)
