"""Paged decode attention as flash-decoding, in Triton.

Decode has one query token per sequence, so one program per (sequence, head) leaves most of a
GPU idle on a small batch with long contexts. Flash-decoding splits each sequence's context
into ``num_splits`` partitions handled by different programs; each returns its unnormalised
partial output with its running max and sum, and a second small kernel combines them:
    out = sum_s exp(m_s - M) * acc_s / sum_s exp(m_s - M) * l_s,   M = max_s m_s.
One program handles a KV head and its whole query group, so a K/V tile is read once per group
(grouped-query attention without repeating K/V). K and V rows are found token by token
through the block table, so the tile width is independent of the block size. With one split
the first kernel writes the normalised output itself and the reduction is skipped. An int8/fp8
cache is dequantized right after the load (``kv_quant``).
The torch twin is ``attention_ref.paged_decode_attention_ref``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kvtide.kernels.kv_quant import is_quantized
from kvtide.kernels.triton_checks import (
    FLOAT_DTYPES,
    check,
    check_device,
    check_head_dim,
    check_host_int,
    check_tensor,
)
from kvtide.kernels.triton_kv_write import check_kv_cache, scale_strides

LOG2E = 1.4426950408889634


@triton.jit
def to_dot(x, DOT: tl.constexpr):
    """``x`` as a ``tl.dot`` operand, in the dtype ``DOT`` names (``dot_config``)."""
    if DOT == "fp16":
        y = x.to(tl.float16)
    elif DOT == "bf16":
        y = x.to(tl.bfloat16)
    elif DOT == "bf16-as-fp32":
        y = x.to(tl.bfloat16).to(tl.float32)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def load_kv_tile(
    k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, tok, valid, d,
    kv_head, block_size, stride_cb, stride_ch, stride_ct, stride_sb, stride_sh, stride_st,
    QUANTIZED: tl.constexpr, DOT: tl.constexpr,
):
    """K and V rows of tokens ``tok`` of one sequence's KV head ([BLOCK_N, HEAD_DIM], zeros where
    not ``valid``), read through its block table and dequantized, in the dots' operand dtype
    (``DOT``, see ``dot_config``). Shared by the decode and prefill kernels."""
    block = tl.load(block_table_ptr + tok // block_size, mask=valid, other=0).to(tl.int64)
    rows = block * stride_cb + kv_head * stride_ch + (tok % block_size) * stride_ct
    k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    if QUANTIZED:
        srows = block * stride_sb + kv_head * stride_sh + (tok % block_size) * stride_st
        k = k * tl.load(k_scale_ptr + srows, mask=valid, other=0.0)[:, None]
        v = v * tl.load(v_scale_ptr + srows, mask=valid, other=0.0)[:, None]
    return to_dot(k, DOT), to_dot(v, DOT)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    scale_log2, block_size, capacity, partition_size, num_splits,
    stride_qs, stride_qh, stride_os, stride_oh,
    stride_cb, stride_ch, stride_ct,
    stride_sb, stride_sh, stride_st,
    stride_bts,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    QUANTIZED: tl.constexpr, DOT: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # NOTE: clamped to the block table's width, so a length that breaks the contract gives a
    # wrong row, never a read past the table.
    seq_len = tl.minimum(tl.load(seq_lens_ptr + seq), capacity)
    start = split * partition_size
    end = tl.minimum(start + partition_size, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    in_group = g < GROUP
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=in_group[:, None], other=0.0)
    q = to_dot(q, DOT)

    # Running max (log2 domain), sum and unnormalised output of each query head in the group.
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    # NOTE: an empty partition (start >= seq_len, a short sequence in a long batch) runs no
    # iteration and leaves m = -inf, l = 0, acc = 0, which the reduction weighs as zero.
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        valid = tok < end
        k, v = load_kv_tile(
            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr + seq * stride_bts, tok, valid, d,
            kv_head, block_size, stride_cb, stride_ch, stride_ct, stride_sb, stride_sh, stride_st, QUANTIZED, DOT,
        )
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # [GROUP_PAD, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        p = to_dot(p, DOT)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m = m_new

    if SINGLE_SPLIT:
        out = acc / l[:, None]
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=in_group[:, None])
    else:
        # acc [num_seqs, num_heads, num_splits, HEAD_DIM]; m, l [num_seqs, num_heads, num_splits].
        row = (seq * GROUP * tl.num_programs(1) + heads) * num_splits + split
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=in_group[:, None])
        tl.store(part_m_ptr + row, m, mask=in_group)
        tl.store(part_l_ptr + row, l, mask=in_group)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    stride_os, stride_oh, num_heads, num_splits,
    BLOCK_H: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    seq = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    row = (seq * num_heads + h[:, None]) * num_splits + sp[None, :]  # [BLOCK_H, SPLITS_PAD]
    used = (h < num_heads)[:, None] & (sp < num_splits)[None, :]
    m = tl.load(part_m_ptr + row, mask=used, other=float("-inf"))
    l = tl.load(part_l_ptr + row, mask=used, other=0.0)
    acc = tl.load(part_acc_ptr + row[:, :, None] * HEAD_DIM + d[None, None, :], mask=used[:, :, None], other=0.0)
    # Split 0 always holds the sequence's first token, so a real head's max is finite; padded
    # heads (all -inf) get weights of 0 instead of NaN and are not stored.
    m_max = tl.max(m, axis=1)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max)[:, None])
    out = tl.sum(acc * w[:, :, None], axis=1) / tl.maximum(tl.sum(l * w, axis=1), 1e-30)[:, None]
    tl.store(out_ptr + seq * stride_os + h[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(h < num_heads)[:, None])


def dot_config(dtype: torch.dtype, kernel) -> str:
    """The dtype ``tl.dot`` takes its operands in, for a query dtype and the kernel that will run
    (compiled, or the interpreter's). The dots' input_precision is "ieee" throughout.

    fp16 and bf16 queries feed the tensor cores their own dtype, with fp32 accumulation, as
    FlashAttention does: Q and K as stored, the softmax weights P rounded to the query's dtype
    before P @ V. fp32 stays exact ("ieee", not TF32).

    NOTE: Triton's interpreter cannot dot bf16 operands (it multiplies their bit patterns;
    triton-lang/triton#11584, "we just don't support it yet"), so under ``TRITON_INTERPRET=1``
    bf16 operands are rounded to bf16 and dotted in fp32 ("bf16-as-fp32"): the same operand
    values, summed in another order. bf16 used to be loaded as fp32 and dotted in TF32 with P
    kept in fp32: on an H200 its prefill reached 43.9 TFLOP/s, 5.6% of the bf16 matmul rate,
    against fp16's 156.8 (bench/README.md, "First numbers: one H200").
    """
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.bfloat16:
        return "bf16-as-fp32" if isinstance(kernel, InterpretedFunction) else "bf16"
    return "fp32"


@functools.cache
def _multi_processor_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Splits exist to fill a GPU's SMs: about two programs per SM, partitions of at least
    128 tokens; one split off CUDA (the interpreter runs programs one after another)."""
    if device.type != "cuda":
        return 1
    programs = 2 * _multi_processor_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(max_seq_len, 128), triton.cdiv(programs, num_seqs * num_kv_heads)))


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    *,
    max_seq_len: int,
) -> torch.Tensor:
    """Same contract as ``paged_decode_attention_ref``, plus ``max_seq_len``.

    query: [num_seqs, num_heads, head_dim] fp32/fp16/bf16 (computed in fp32);
    k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim] of query's dtype, or
    int8/fp8 with k_scale, v_scale [num_blocks, num_kv_heads, block_size] fp32;
    block_tables: [num_seqs, max_blocks] int32/int64; seq_lens: [num_seqs] int32/int64 on the
    query's device. ``max_seq_len``: a host int, at least every ``seq_lens`` value (the batch's
    maximum, known when the batch was packed); it sizes the splits and tiles. ``num_splits``
    partitions per sequence (None: by size).

    Never reads device memory, so it never syncs with the host. The producer's contract,
    unchecked here: each ``seq_lens[i]`` in ``[1, max_seq_len]`` and its first
    ``ceil(seq_lens[i] / block_size)`` table entries valid block ids. A length past the
    table's width is clamped to it; one past ``max_seq_len`` loses its last tokens.
    """
    check_tensor("query", query, dim=3, dtypes=FLOAT_DTYPES)
    num_seqs, num_heads, head_dim = query.shape
    check_head_dim(head_dim)
    check_kv_cache(k_cache, v_cache, k_scale, v_scale, head_dim, query.dtype)
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    check(num_heads % num_kv_heads == 0, f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    check_tensor("block_tables", block_tables, dim=2, dtypes=(torch.int32, torch.int64), shape=(num_seqs, None))
    check_tensor("seq_lens", seq_lens, dim=1, dtypes=(torch.int32, torch.int64), shape=(num_seqs,))
    if out is None:
        out = torch.empty_like(query)
    check_tensor("out", out, dim=3, dtypes=(query.dtype,), shape=query.shape)
    check_device(_decode_split_kernel, query=query, k_cache=k_cache, v_cache=v_cache, k_scale=k_scale,
                 v_scale=v_scale, block_tables=block_tables, seq_lens=seq_lens, out=out)
    capacity = block_tables.shape[1] * block_size
    hi = check_host_int("max_seq_len", max_seq_len, min(1, num_seqs), capacity, " (block_tables width x block_size)")
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, hi, query.device)
    check(isinstance(num_splits, int) and num_splits >= 1, f"num_splits must be an int >= 1, got {num_splits!r}")

    group = num_heads // num_kv_heads
    # NOTE: tl.dot needs at least 16 rows, so a small group is padded with masked rows; the
    # kernel is bound by reading K/V, not by these wasted multiplies.
    group_pad = max(16, triton.next_power_of_2(group))
    block_n = min(64, max(16, triton.next_power_of_2(triton.cdiv(hi, num_splits))))
    partition = triton.cdiv(triton.cdiv(hi, num_splits), block_n) * block_n
    num_splits = triton.cdiv(hi, partition)  # no partition starts past the longest sequence
    single = num_splits == 1
    part_acc = torch.empty(0 if single else num_seqs * num_heads * num_splits * head_dim,
                           dtype=torch.float32, device=query.device)
    part_m = torch.empty(0 if single else num_seqs * num_heads * num_splits, dtype=torch.float32, device=query.device)
    part_l = torch.empty_like(part_m)
    dot = dot_config(query.dtype, _decode_split_kernel)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache,
        k_scale if k_scale is not None else k_cache, v_scale if v_scale is not None else v_cache,
        block_tables, seq_lens, out, part_acc, part_m, part_l,
        scale * LOG2E, block_size, capacity, partition, num_splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *scale_strides(k_scale),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_N=block_n,
        QUANTIZED=is_quantized(k_cache.dtype), DOT=dot, SINGLE_SPLIT=single,
    )
    if not single:
        splits_pad = triton.next_power_of_2(num_splits)
        block_h = max(1, min(triton.next_power_of_2(num_heads), 4096 // (splits_pad * head_dim)))
        _decode_reduce_kernel[(num_seqs, triton.cdiv(num_heads, block_h))](
            out, part_acc, part_m, part_l, out.stride(0), out.stride(1), num_heads, num_splits,
            BLOCK_H=block_h, SPLITS_PAD=splits_pad, HEAD_DIM=head_dim,
        )
    return out
