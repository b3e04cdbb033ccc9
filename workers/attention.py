"""Attention over the paged KV cache: per-step metadata and the registered backends
(``torch``, ``cpu``, ``triton``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvtide.kernels import cpu_attention, cpu_build, cpu_ops, cpu_prefill
from kvtide.kernels.attention_ref import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    write_kv_ref,
)
from kvtide.kernels.kv_quant import split_kv_cache


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
    """num_prefills + 1 offsets into the prefill part of the batch (host)."""
    prefill_seq_lens: list[int]
    """Host copy of each prefill's context length after this chunk."""
    prefill_query_start_loc_t: torch.Tensor | None = None
    """``prefill_query_start_loc`` on the batch's device, int64: what kernels read."""
    prefill_seq_lens_t: torch.Tensor | None = None
    """``prefill_seq_lens`` on the batch's device, int64."""
    max_decode_seq_len: int = 0
    """Host-side bounds, prepared with the batch, so no kernel launcher reads device memory."""
    max_prefill_query_len: int = 0
    max_prefill_seq_len: int = 0


class TorchAttentionBackend:
    """The pure-torch path; the twin every compiled kernel is checked against.

    Caches come from ``kv_quant.allocate_kv_cache``: an int8/fp8 cache carries its per-row
    scales in each block, and ``forward`` splits them out for the kernels.
    """

    name = "torch"
    write_kv = staticmethod(write_kv_ref)
    prefill = staticmethod(paged_prefill_attention_ref)

    def decode(
        self, q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale=None, v_scale=None, out=None
    ) -> torch.Tensor:
        return paged_decode_attention_ref(
            q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale, out=out
        )

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
        head_dim = q.shape[-1]
        k_cache, k_scale = split_kv_cache(k_cache, head_dim)
        v_cache, v_scale = split_kv_cache(v_cache, head_dim)
        self.write_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        nd = meta.num_decode_tokens
        caches = (k_cache, v_cache)
        if nd == q.shape[0]:
            return self.decode(q, *caches, meta.decode_block_tables, meta.decode_seq_lens, scale, k_scale, v_scale)
        out = torch.empty_like(q)
        if nd:
            self.decode(
                q[:nd], *caches, meta.decode_block_tables, meta.decode_seq_lens, scale, k_scale, v_scale,
                out=out[:nd],
            )
        self.prefill(
            q[nd:],
            *caches,
            meta.prefill_block_tables,
            meta.prefill_query_start_loc,
            meta.prefill_seq_lens,
            scale,
            k_scale,
            v_scale,
            out=out[nd:],
            key=k[nd:],
            value=v[nd:],
        )
        return out


class CpuAttentionBackend(TorchAttentionBackend):
    """Decode, prefill and KV writes through the compiled CPU kernels (fp32).

    NOTE: the C++ kernels read fp32 caches only; an int8/fp8 cache attends through the torch
    twins, which dequantize the gathered blocks. So does every cache when the kernels did not
    build (``cpu_attention.available()`` said why, once), and prefill with a head size the
    kernel has no instance for (``cpu_prefill.SUPPORTED_HEAD_DIMS``) or on a host without
    AVX2, where torch's SDPA is faster (``cpu_prefill.beats_the_twin``).
    """

    def prefill(
        self, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, k_scale=None, v_scale=None,
        out=None, key=None, value=None,
    ) -> torch.Tensor:  # fmt: skip
        if (
            k_scale is not None or k_cache.dtype != torch.float32 or q.dtype != torch.float32
            or q.shape[-1] not in cpu_prefill.SUPPORTED_HEAD_DIMS or not cpu_prefill.beats_the_twin()
            or not cpu_attention.available()
        ):  # fmt: skip
            return paged_prefill_attention_ref(
                q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, k_scale, v_scale,
                out=out, key=key, value=value,
            )  # fmt: skip
        as_tensor = lambda x: x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.int64)  # noqa: E731
        return cpu_attention.paged_prefill_attention_cpu(
            q, k_cache, v_cache, block_tables, as_tensor(query_start_loc), as_tensor(seq_lens), scale, out=out
        )

    name = "cpu"

    @staticmethod
    def write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
        if k_scale is None and cpu_ops.usable(k, v, k_cache):
            cpu_ops.write_kv(k, v, k_cache, v_cache, slot_mapping)
        else:
            write_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def decode(
        self, q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale=None, v_scale=None, out=None
    ) -> torch.Tensor:
        if k_scale is not None or k_cache.dtype != torch.float32 or not cpu_attention.available():
            return super().decode(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale, out)
        result = cpu_attention.paged_decode_attention_cpu(
            q.contiguous(), k_cache, v_cache, block_tables, seq_lens, scale
        )
        if out is None:
            return result
        out.copy_(result)
        return out


class TritonAttentionBackend(TorchAttentionBackend):
    """The Triton kernels: KV write, flash-decoding and FlashAttention-2-style prefill.

    Imported on construction, not with this module: the kernels are compiled for CUDA, or run
    by the interpreter when ``TRITON_INTERPRET=1`` was set before they were first imported.

    NOTE: ``forward`` never reads device memory: the launchers take the metadata's device
    tensors and its host-side maxima (``max_decode_seq_len``, ``max_prefill_query_len``,
    ``max_prefill_seq_len``), prepared once per step with the batch. ``decode`` and
    ``prefill`` are the launchers themselves, whose signatures add those maxima.
    """

    name = "triton"

    def __init__(self) -> None:
        from kvtide.kernels.triton_decode import paged_decode_attention
        from kvtide.kernels.triton_kv_write import write_kv
        from kvtide.kernels.triton_prefill import paged_prefill_attention

        self.write_kv = write_kv
        self.decode = paged_decode_attention
        self.prefill = paged_prefill_attention

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
        head_dim = q.shape[-1]
        k_cache, k_scale = split_kv_cache(k_cache, head_dim)
        v_cache, v_scale = split_kv_cache(v_cache, head_dim)
        self.write_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        nd = meta.num_decode_tokens
        out = torch.empty_like(q)
        if nd:
            self.decode(
                q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale, k_scale, v_scale,
                out=out[:nd], max_seq_len=meta.max_decode_seq_len,
            )
        if nd < q.shape[0]:
            if meta.prefill_query_start_loc_t is None or meta.prefill_seq_lens_t is None:
                raise ValueError(
                    "the triton attention backend needs prefill_query_start_loc_t and prefill_seq_lens_t "
                    "(the device copies pack_batch makes); this AttentionMetadata has None"
                )
            self.prefill(
                q[nd:], k_cache, v_cache, meta.prefill_block_tables, meta.prefill_query_start_loc_t,
                meta.prefill_seq_lens_t, scale, k_scale, v_scale, out=out[nd:],
                max_query_len=meta.max_prefill_query_len, max_seq_len=meta.max_prefill_seq_len,
            )
        return out


ATTENTION_BACKENDS: dict[str, Callable[[], TorchAttentionBackend]] = {
    "torch": TorchAttentionBackend,
    "cpu": CpuAttentionBackend,
    "triton": TritonAttentionBackend,
}


def get_attention_backend(name: str) -> TorchAttentionBackend:
    try:
        return ATTENTION_BACKENDS[name]()
    except KeyError:
        known = ", ".join(sorted(ATTENTION_BACKENDS))
        raise ValueError(f"unknown attention backend {name!r}; known: {known}") from None


def default_attention_backend(device: torch.device, dtype: torch.dtype) -> str:
    """``triton`` on CUDA; ``cpu`` for fp32 on a CPU where the kernel is built or can be (the shard
    builds it before it reports ready, and its torch twin serves if that fails); else ``torch``.
    Never compiles: the process that resolves a config may not be the one that runs it."""
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and dtype == torch.float32 and cpu_build.buildable(cpu_attention.EXTENSION):
        return "cpu"
    return "torch"
