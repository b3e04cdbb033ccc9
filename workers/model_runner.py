"""Turns a ``StepPlan`` into one flat, unpadded batch, runs it on an executor, and samples."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from kvtide.workers.attention import AttentionMetadata
from kvtide.workers.request import Request
from kvtide.workers.sampler import SampledToken, Sampler, SamplingRow
from kvtide.workers.scheduler import StepPlan
from kvtide.workers.step_inputs import StepInputs


class Executor(Protocol):
    """Runs a step on every shard of a replica: a local ``ShardRunner``, or Ray workers."""

    device: torch.device
    """Where the step's input tensors are built."""

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [num_sampled_seqs, vocab_size] for the rows in ``inputs.logits_indices``."""
        ...


class ModelRunner:
    """Driver side of a replica: packs the batch, runs it on the executor, samples."""

    def __init__(
        self,
        executor: Executor,
        block_size: int,
        sampling_row: Callable[[Request], SamplingRow],
    ) -> None:
        self.executor = executor
        self.block_size = block_size
        self._sampling_row = sampling_row
        self.sampler = Sampler()

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[tuple[Request, SampledToken]]:
        """Run one step; returns the sampled token of every sampling request (forks included)."""
        inputs = prepare_inputs(plan, self.block_size, self.executor.device)
        logits = self.executor.forward(inputs)
        sampling = [c for c in plan.chunks if c.sample]
        if not sampling:
            return []
        # A request forked this step and its children sample from the same logits row.
        repeats = [1 + len(c.forks) for c in sampling]
        if any(r > 1 for r in repeats):
            logits = logits.repeat_interleave(torch.tensor(repeats, device=logits.device), dim=0)
        requests = [r for c in sampling for r in (c.request, *c.forks)]
        sampled = self.sampler(logits, [self._sampling_row(r) for r in requests])
        return list(zip(requests, sampled, strict=True))


def prepare_inputs(plan: StepPlan, block_size: int, device: torch.device) -> StepInputs:
    """Pack a plan's chunks into one flat batch (decodes first, then prefill chunks)."""
    bs = block_size
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_indices: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    prefill_tables: list[list[int]] = []
    prefill_lens: list[int] = []
    query_start = [0]
    for c in plan.chunks:
        r, start, n = c.request, c.start, c.num_new_tokens
        end = start + n
        if n == 1 and r.output_token_ids and start == r.num_tokens - 1:
            input_ids.append(r.output_token_ids[-1])
        else:
            input_ids.extend(r.all_token_ids[start:end])
        positions.extend(range(start, end))
        table = r.block_ids
        slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        if c.sample:
            logits_indices.append(len(input_ids) - 1)
        if n == 1:
            decode_tables.append(table)
            decode_lens.append(end)
        else:
            prefill_tables.append(table)
            prefill_lens.append(end)
            query_start.append(query_start[-1] + n)

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    meta = AttentionMetadata(
        slot_mapping=ints(slots),
        num_decode_tokens=len(decode_lens),
        decode_block_tables=_pad_tables(decode_tables, device),
        decode_seq_lens=ints(decode_lens),
        prefill_block_tables=_pad_tables(prefill_tables, device),
        prefill_query_start_loc=query_start,
        prefill_seq_lens=prefill_lens,
    )
    return StepInputs(ints(input_ids), ints(positions), meta, ints(logits_indices), plan.block_copies)


def _pad_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """[num_seqs, max_blocks] int64; rows padded with block 0, never read past seq_len."""
    width = max((len(t) for t in tables), default=0)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64, device=device)
