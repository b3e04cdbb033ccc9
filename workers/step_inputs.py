"""The per-step batch that the driver builds once and every shard consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtide.workers.attention import AttentionMetadata


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
