"""Attention over the paged KV cache: per-step metadata and the registered backends."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvtide.kernels import cpu_attention
from kvtide.kernels.attention_ref import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    write_kv_ref,
)


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each token of a flat batch goes in the cache and what it attends to.

    The batch is ordered decodes first: tokens ``[0, num_decode_tokens)`` are one query token
    per sequence; the rest are prefill chunks packed back to back.
    """

    slot_mapping: torch.Tensor
    """Shape (num_tokens,), int64: flat cache slot of each new token."""
    num_decode_tokens: int
    decode_block_tables: torch.Tensor
    """Shape (num_decodes, max_blocks), int64."""
    decode_seq_lens: torch.Tensor
    """Shape (num_decodes,), int64: context length including the new token."""
    prefill_block_tables: torch.Tensor
    """Shape (num_prefills, max_blocks), int64."""
    prefill_query_start_loc: list[int]
    """num_prefills + 1 offsets into the prefill part of the batch."""
    prefill_seq_lens: list[int]


class TorchAttentionBackend:
    """The pure-torch path; the twin every compiled kernel is checked against."""

    name = "torch"

    def decode(self, q, k_cache, v_cache, block_tables, seq_lens, scale) -> torch.Tensor:
        return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]."""
        write_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decode_tokens
        if nd == q.shape[0]:
            return self.decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self.decode(
                q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale
            )
        out[nd:] = paged_prefill_attention_ref(
            q[nd:],
            k_cache,
            v_cache,
            meta.prefill_block_tables,
            meta.prefill_query_start_loc,
            meta.prefill_seq_lens,
            scale,
        )
        return out


class CpuAttentionBackend(TorchAttentionBackend):
    """Decode through the compiled CPU kernel (fp32); prefill through the torch path."""

    name = "cpu"

    def decode(self, q, k_cache, v_cache, block_tables, seq_lens, scale) -> torch.Tensor:
        return cpu_attention.paged_decode_attention_cpu(
            q.contiguous(), k_cache, v_cache, block_tables, seq_lens, scale
        )


ATTENTION_BACKENDS: dict[str, Callable[[], TorchAttentionBackend]] = {
    "torch": TorchAttentionBackend,
    "cpu": CpuAttentionBackend,
}


def get_attention_backend(name: str) -> TorchAttentionBackend:
    try:
        return ATTENTION_BACKENDS[name]()
    except KeyError:
        known = ", ".join(sorted(ATTENTION_BACKENDS))
        raise ValueError(f"unknown attention backend {name!r}; known: {known}") from None


def default_attention_backend(device: torch.device, dtype: torch.dtype) -> str:
    """``cpu`` for fp32 on a CPU whose compiler built the kernel, else ``torch``."""
    if device.type == "cpu" and dtype == torch.float32 and cpu_attention.available():
        return "cpu"
    return "torch"
