"""Offline batch generation: ``LLM("smollm2-135m").generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Sequence

from kvtide.workers.engine import Engine
from kvtide.workers.outputs import Completion, RequestOutput
from kvtide.workers.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "smollm2-135m", engine: Engine | None = None, **kwargs) -> None:
        self.engine = engine or Engine.load(model, **kwargs)

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, all submitted at once; results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        requests = [
            self.engine.make_request(f"llm-{i}", p, sp)
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]
        for r in requests:
            self.engine.add(r)
        tokens: dict[tuple[str, int], list] = {}
        finals: dict[tuple[str, int], Completion] = {}
        while self.engine.has_unfinished_requests():
            for d in self.engine.step():
                key = (d.request_id, d.index)
                acc = tokens.setdefault(key, [[], [], []])
                acc[0].extend(d.token_ids)
                acc[1].append(d.text)
                acc[2].extend(d.logprobs)
                if d.finished:
                    finals[key] = Completion(
                        d.index, tuple(acc[0]), "".join(acc[1]), d.finish_reason, d.stop_reason,
                        tuple(acc[2]),
                    )
        return [
            RequestOutput(
                r.request_id,
                tuple(r.prompt_token_ids),
                tuple(finals[(r.request_id, i)] for i in range(r.params.n)),
                r.num_cached_prompt_tokens,
            )
            for r in requests
        ]
