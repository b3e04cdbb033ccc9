"""Paged prefill / chunked-prefill attention, FlashAttention-2 style, in Triton.

The new tokens of several sequences are packed in one flat batch (no padding): sequence ``i``
owns query rows ``query_start_loc[i]:query_start_loc[i+1]``, the last tokens of its
``seq_lens[i]`` context, whose K/V (cached prefix and the new tokens alike) are already in the
paged cache. Each program takes a tile of one sequence's query tokens for one KV head, with the
whole query group folded into the tile's rows (row r = token r // GROUP_PAD, head r % GROUP_PAD),
so every K/V tile read serves the group. It walks K/V tiles through the block table with an
online softmax and never materialises the score matrix; tiles past the tile's last query
position are skipped (causal). The torch twin is ``attention_ref.paged_prefill_attention_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtide.kernels.kv_quant import is_quantized
from kvtide.kernels.triton_checks import (
    FLOAT_DTYPES,
    check,
    check_device,
    check_head_dim,
    check_host_int,
    check_tensor,
)
from kvtide.kernels.triton_decode import LOG2E, dot_config, load_kv_tile, to_dot
from kvtide.kernels.triton_kv_write import check_kv_cache, scale_strides


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr,
    query_start_loc_ptr, seq_lens_ptr, out_ptr,
    scale_log2, block_size, capacity, num_tokens,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ch, stride_ct,
    stride_sb, stride_sh, stride_st,
    stride_bts,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, QUANTIZED: tl.constexpr, DOT: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q < q_len:
        # NOTE: clamps and masks keep offsets or lengths that break the launcher's contract
        # inside the block table and the query rows: a wrong result, never a stray access.
        seq_len = tl.minimum(tl.load(seq_lens_ptr + seq), capacity)
        context = seq_len - q_len  # cached tokens before the first new one

        r = tl.arange(0, BLOCK_Q * GROUP_PAD)
        token = q_tile * BLOCK_Q + r // GROUP_PAD
        head = kv_head * GROUP + r % GROUP_PAD
        row_ok = (token < q_len) & (r % GROUP_PAD < GROUP) & (q_start + token >= 0) & (q_start + token < num_tokens)
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        q = to_dot(q, DOT)
        pos = context + token  # each row's position in its sequence

        m = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
        acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], tl.float32)
        # NOTE: every row sees key 0, which is in the first tile, so m is finite from the first
        # iteration on and exp2(m - m_new) never meets -inf - -inf.
        kv_end = tl.minimum(seq_len, context + (q_tile + 1) * BLOCK_Q)
        for n0 in range(0, kv_end, BLOCK_N):
            tok = n0 + tl.arange(0, BLOCK_N)
            valid = tok < kv_end
            k, v = load_kv_tile(
                k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr + seq * stride_bts, tok, valid, d,
                kv_head, block_size, stride_cb, stride_ch, stride_ct, stride_sb, stride_sh, stride_st, QUANTIZED, DOT,
            )
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
            s = tl.where(valid[None, :] & (tok[None, :] <= pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            p = to_dot(p, DOT)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m = m_new

        out = acc / l[:, None]
        tl.store(out_ptr + (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    max_query_len: int,
    max_seq_len: int,
) -> torch.Tensor:
    """Same contract as ``paged_prefill_attention_ref``, with the offsets and lengths as
    tensors on the query's device and their maxima as host ints.

    query: [num_tokens, num_heads, head_dim] fp32/fp16/bf16; k_cache, v_cache and their
    scales as for ``paged_decode_attention``; block_tables: [num_seqs, max_blocks];
    query_start_loc: [num_seqs + 1] int32/int64; seq_lens: [num_seqs] int32/int64.
    ``max_query_len`` (sizes the grid) and ``max_seq_len``: host ints, at least the largest
    query length and sequence length (the batch's maxima, known when it was packed).

    Never reads device memory, so it never syncs with the host. The producer's contract,
    unchecked here: ``query_start_loc`` rises from 0 to num_tokens; each ``seq_lens[i]`` is
    in ``[its query length, max_seq_len]``, with that many tokens' blocks in its table row;
    each query length is at most ``max_query_len`` (rows past it are not computed).
    """
    check_tensor("query", query, dim=3, dtypes=FLOAT_DTYPES)
    num_tokens, num_heads, head_dim = query.shape
    check_head_dim(head_dim)
    check_kv_cache(k_cache, v_cache, k_scale, v_scale, head_dim, query.dtype)
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    check(num_heads % num_kv_heads == 0, f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    check_tensor("seq_lens", seq_lens, dim=1, dtypes=(torch.int32, torch.int64))
    num_seqs = seq_lens.shape[0]
    check_tensor("query_start_loc", query_start_loc, dim=1, dtypes=(torch.int32, torch.int64), shape=(num_seqs + 1,))
    check_tensor("block_tables", block_tables, dim=2, dtypes=(torch.int32, torch.int64), shape=(num_seqs, None))
    if out is None:
        out = torch.empty_like(query)
    check_tensor("out", out, dim=3, dtypes=(query.dtype,), shape=query.shape)
    check_device(_prefill_kernel, query=query, k_cache=k_cache, v_cache=v_cache, k_scale=k_scale,
                 v_scale=v_scale, block_tables=block_tables, query_start_loc=query_start_loc,
                 seq_lens=seq_lens, out=out)
    capacity = block_tables.shape[1] * block_size
    busy = num_seqs > 0 and num_tokens > 0
    q_hi = check_host_int("max_query_len", max_query_len, int(busy), num_tokens, " (num_tokens)")
    check_host_int("max_seq_len", max_seq_len, q_hi, capacity, " (max_query_len, block_tables width x block_size)")
    if not busy:
        return out
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    # NOTE: 64 query rows (tokens x group) and 64 keys per tile; tl.dot needs 16 of each.
    block_q = max(1, 64 // group_pad)
    dot = dot_config(query.dtype, _prefill_kernel)
    grid = (num_seqs, triton.cdiv(q_hi, block_q), num_kv_heads)
    _prefill_kernel[grid](
        query, k_cache, v_cache,
        k_scale if k_scale is not None else k_cache, v_scale if v_scale is not None else v_cache,
        block_tables, query_start_loc, seq_lens, out,
        scale * LOG2E, block_size, capacity, num_tokens,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *scale_strides(k_scale),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, HEAD_DIM=head_dim,
        BLOCK_N=64, QUANTIZED=is_quantized(k_cache.dtype), DOT=dot,
    )
    return out
