"""Turns a ``StepPlan`` into one flat, unpadded batch, runs the model, and samples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvtide.workers.attention import AttentionMetadata, get_attention_backend
from kvtide.workers.models.llama import LlamaForCausalLM
from kvtide.workers.request import Request
from kvtide.workers.sampler import SampledToken, Sampler, SamplingRow
from kvtide.workers.scheduler import StepPlan


@dataclass(frozen=True)
class StepInputs:
    """Everything a model shard needs for one step, built once by the driver."""

    input_ids: torch.Tensor
    """Shape (num_tokens,), int64."""
    positions: torch.Tensor
    """Shape (num_tokens,), int64."""
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    """Shape (num_sampled_seqs,): the rows of the batch whose logits are needed."""
    block_copies: tuple[tuple[int, int], ...]


class ModelRunner:
    """Holds the model and its paged KV cache (one K and one V tensor per layer).

    Cache shape per layer: [num_blocks, block_size, num_kv_heads, head_dim].
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        sampling_row: Callable[[Request], SamplingRow],
        kv_dtype: torch.dtype | None = None,
        attention_backend: str = "torch",
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = next(model.parameters()).device
        self._sampling_row = sampling_row
        self.sampler = Sampler()
        self.backend = get_attention_backend(attention_backend)
        attn = model.layers[0].self_attn
        dtype = kv_dtype or next(model.parameters()).dtype
        shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=self.device),
             torch.zeros(shape, dtype=dtype, device=self.device))
            for _ in model.layers
        ]

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[tuple[Request, SampledToken]]:
        """Run one step; returns the sampled token of every sampling request (forks included)."""
        inputs = prepare_inputs(plan, self.block_size, self.device)
        logits = self.forward(inputs)
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

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Copy-on-write copies, then the model; returns logits [num_sampled_seqs, vocab]."""
        for src, dst in inputs.block_copies:
            for k_cache, v_cache in self.kv_caches:
                k_cache[dst].copy_(k_cache[src])
                v_cache[dst].copy_(v_cache[src])
        hidden, _ = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, self.backend)
        return self.model.compute_logits(hidden[inputs.logits_indices])


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
