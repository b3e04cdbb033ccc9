"""The sampling shard's per-request state: params, a seeded generator on its device, and the
token history the penalties read, kept current from the step deltas themselves.

Only the shard that samples (the last pipeline stage's TP rank 0) keeps it. A request's state
is made from the ``SamplingSpec`` on its first chunk, a forked choice's from its parent's at
the fork; every chunk writes its tokens into the history at their positions (a decode brings
the token sampled the step before; a preempted request's recompute rewrites from 0), and a
freed request's state is dropped.
"""

from __future__ import annotations

import torch

from kvtide.workers.sampler import SamplingRow
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.step_inputs import ChunkDelta, StepDelta


class _State:
    __slots__ = ("params", "seed", "num_prompt", "tokens", "generator")

    def __init__(self, params: SamplingParams, seed: int, tokens: list[int], num_prompt: int, device) -> None:
        self.params, self.seed, self.num_prompt, self.tokens = params, seed, num_prompt, tokens
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)


class SamplingState:
    def __init__(self, device: torch.device, eos_token_ids: frozenset[int]) -> None:
        self.device = device
        self.eos_token_ids = eos_token_ids
        self._requests: dict[str, _State] = {}

    def apply(self, delta: StepDelta) -> list[SamplingRow]:
        """Bring the state up to ``delta``; returns the step's sampling rows, in plan order."""
        if delta.reset:
            self._requests.clear()
        for rid in delta.freed:
            self._requests.pop(rid, None)
        rows = []
        for c in delta.chunks:
            state = self._state(c)
            del state.tokens[c.start :]
            state.tokens.extend(c.token_ids)
            if not c.sample:
                continue
            rows.append(self._row(state))
            for fork in c.forks:
                child = self._requests[fork.request_id] = _State(
                    state.params, fork.seed, list(state.tokens), state.num_prompt, self.device
                )
                rows.append(self._row(child))
        return rows

    def _state(self, c: ChunkDelta) -> _State:
        state = self._requests.get(c.request_id)
        if state is None:
            if c.spec is None:
                raise RuntimeError(
                    f"request {c.request_id!r} reached the sampling shard without its sampling spec: "
                    "deltas were applied out of order or one was lost"
                )
            prompt = list(c.spec.prompt_token_ids)
            state = self._requests[c.request_id] = _State(c.spec.params, c.spec.seed, prompt, len(prompt), self.device)
        return state

    def _row(self, state: _State) -> SamplingRow:
        p = state.params
        stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
        return SamplingRow(p, state.tokens[: state.num_prompt], state.tokens[state.num_prompt :], state.generator, stop_ids)

    def __len__(self) -> int:
        return len(self._requests)
