"""Pure-torch paged attention: the CPU path of the engine and the oracle of the Triton kernels.

Cache layout, shared by every backend:
    k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim]
A token at position ``p`` of a sequence lives in block ``block_table[p // block_size]`` at
offset ``p % block_size``; its flat slot is ``block * block_size + offset``. Keeping the heads
outside the block makes each (block, head) a contiguous [block_size, head_dim] tile, so
gathered blocks feed a batched matmul without another copy.

Grouped-query attention never repeats K/V (``enable_gqa``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtide.kernels.kv_quant import dequantize_ref, is_quantized, quantize_ref


def write_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter new K/V into the cache.

    key, value: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens] int64.
    For an int8/fp8 cache, k_scale, v_scale: [num_blocks, num_kv_heads, block_size] fp32
    receive each row's scale (``kv_quant`` describes the scheme).
    """
    block_size = k_cache.shape[2]
    keep = slot_mapping >= 0  # a negative slot marks a padding token
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    if is_quantized(k_cache.dtype):
        for x, cache, scales in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
            codes, row_scales = quantize_ref(x, cache.dtype)
            cache[blocks, :, offsets] = codes
            scales[blocks, :, offsets] = row_scales
        return
    k_cache[blocks, :, offsets] = key.to(k_cache.dtype)
    v_cache[blocks, :, offsets] = value.to(v_cache.dtype)


def paged_decode_attention_ref(
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
) -> torch.Tensor:
    """One query token per sequence attending to its whole cached context.

    query: [num_seqs, num_heads, head_dim]; block_tables: [num_seqs, max_blocks] int;
    seq_lens: [num_seqs] int (context length including the query token, already cached).
    k_scale, v_scale: [num_blocks, num_kv_heads, block_size] fp32 for an int8/fp8 cache.
    ``num_splits`` (how many programs share one sequence in the flash-decoding kernel) only
    reorders the sums, so the twin ignores it. Writes into ``out`` when given.
    Returns [num_seqs, num_heads, head_dim].

    NOTE: a per-sequence loop. One batched flash-decoding pass over all (sequence, block)
    pairs was tried and was no faster on a 2-core CPU (32 seqs: 9.8 vs 10.0 ms per layer;
    1 seq: 0.62 vs 0.29 ms): tiny per-block GEMMs and masking stale V rows cost what the loop
    saves. The Triton kernel is where that design belongs.
    """
    out = torch.empty_like(query) if out is None else out
    for i, seq_len in enumerate(seq_lens.tolist()):
        k = _gather(k_cache, k_scale, block_tables[i], seq_len, query.dtype)
        v = _gather(v_cache, v_scale, block_tables[i], seq_len, query.dtype)
        out[i] = _attend(query[i : i + 1], k, v, scale)[0]
    return out


def _gather(
    cache: torch.Tensor,
    scales: torch.Tensor | None,
    block_table: torch.Tensor,
    num_tokens: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The first ``num_tokens`` cached rows of one sequence, dequantized when ``scales`` is
    given: [num_kv_heads, num_tokens, head_dim]."""
    block_size = cache.shape[2]
    used = block_table[: (num_tokens + block_size - 1) // block_size]
    blocks = cache.index_select(0, used)  # [nb, Hkv, block_size, D]
    if scales is not None:
        blocks = dequantize_ref(blocks, scales.index_select(0, used), dtype)
    return blocks.transpose(0, 1).flatten(1, 2)[:, :num_tokens]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence: q [q_len, num_heads, head_dim] are the last q_len of the L positions of
    k, v [num_kv_heads, L, head_dim], causal. Returns [q_len, num_heads, head_dim].

    Computed as transformers' default (sdpa) attention does, in every dtype: torch's fused
    CPU kernel, scores and softmax in fp32, grouped-query heads without repeating K/V. In
    bf16/fp16 a matmul with bf16-rounded scores drifts from it (SmolLM2 bf16, 8 prompts x 32
    greedy tokens: 67% of tokens the same, against 100% here). In fp32 it is also the faster
    path: an explicit scores matmul + mask + softmax took 2-6x longer on 128-2,048-token
    prefills and 1.1-3x on decode (bench/README.md, "prefill attention")."""
    q_len, seq_len = q.shape[0], k.shape[1]
    mask = None
    if 1 < q_len < seq_len:  # the last q_len of seq_len positions: causal with an offset
        mask = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device).tril_(seq_len - q_len)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k[None].to(q.dtype), v[None].to(q.dtype), attn_mask=mask,
        is_causal=1 < q_len == seq_len, scale=scale, enable_gqa=True,
    )  # fmt: skip
    return out[0].transpose(0, 1)


def paged_prefill_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: list[int] | torch.Tensor,
    seq_lens: list[int] | torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Variable-length queries packed in one flat batch, causal, over a cached prefix.

    query: [num_tokens, num_heads, head_dim], sequence ``i`` owning rows
    ``query_start_loc[i]:query_start_loc[i+1]``, which are the last tokens of its
    ``seq_lens[i]`` context tokens (all already written to the cache). k_scale, v_scale as
    for decode. Writes into ``out`` when given. Returns [num_tokens, num_heads, head_dim].

    key, value: optionally the batch's own new keys and values [num_tokens, num_kv_heads,
    head_dim], as just written to an unquantized cache. A sequence whose chunk is its whole
    context (no cached prefix) then attends to them directly, the same values without
    gathering its blocks back out of the cache (a copy of every K and V row per layer).
    """
    out = torch.empty_like(query) if out is None else out
    if isinstance(seq_lens, torch.Tensor):
        query_start_loc, seq_lens = query_start_loc.tolist(), seq_lens.tolist()
    fresh = key is not None and value is not None and k_scale is None and v_scale is None
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        if fresh and end - start == seq_len:
            k, v = key[start:end].transpose(0, 1), value[start:end].transpose(0, 1)
        else:
            k = _gather(k_cache, k_scale, block_tables[i], seq_len, query.dtype)
            v = _gather(v_cache, v_scale, block_tables[i], seq_len, query.dtype)
        out[start:end] = _attend(query[start:end], k, v, scale)
    return out
