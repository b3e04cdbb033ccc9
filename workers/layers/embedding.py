"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocab."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvtide.kernels import cpu_linear
from kvtide.workers.parallel import SINGLE, TensorParallel


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        tp: TensorParallel = SINGLE,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.local_vocab = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.local_vocab
        # In the model dtype, as the LM head sharing it (logits are cast to fp32 after).
        self.weight = nn.Parameter(
            torch.zeros(self.local_vocab, hidden_size, dtype=dtype), requires_grad=False
        )

    def load(self, shard: int, weight: Any, is_bias: bool = False) -> None:
        end = min(self.vocab_start + self.local_vocab, self.vocab_size)
        self.weight[: end - self.vocab_start].copy_(weight[self.vocab_start : end])
        # The last rank's padding rows (vocab not divisible by tp) have no checkpoint rows;
        # the storage may come uninitialized from ``to_empty``, so they are zeroed here.
        self.weight[max(0, end - self.vocab_start) :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [num_tokens] -> [num_tokens, hidden]."""
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0.0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over this rank's vocab slice, gathered to the full vocabulary."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [num_seqs, hidden] -> logits [num_seqs, vocab_size] (float32).

        NOTE: fp32 on the CPU: up to ``cpu_linear.MAX_ROWS`` rows (16; 1,024 on AVX2 hosts,
        where its packed panels take 18 and more) through kvtide's kernel (it streams the
        [vocab, hidden] weight once: 2-3x faster than MKL at 2-16 rows, bench/linear_small_m.py);
        up to 32 as (W @ hidden^T)^T, which on the Intel host's MKL runs 1.3-2.2x faster than
        F.linear for a 49152 x 576 head; above that F.linear, faster there
        (bench/linear_layout.py). No second copy of the tied weight. bf16/fp16 always use
        F.linear, transformers' own matmul (no faster either way there).
        """
        if cpu_linear.usable(hidden, self.weight):
            local = cpu_linear.linear(hidden, self.weight)
        elif hidden.shape[0] <= 32 and hidden.dtype == torch.float32:
            local = torch.mm(self.weight, hidden.t()).t().contiguous()
        else:
            local = F.linear(hidden, self.weight)
        logits = self.tp.all_gather(local, dim=-1)
        return logits[:, : self.vocab_size].float()
