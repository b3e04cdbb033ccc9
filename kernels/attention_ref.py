"""Pure-torch paged attention: the CPU path of the engine and the oracle of the Triton kernels.

Cache layout, shared by every backend:
    k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim]
A token at position ``p`` of a sequence lives in block ``block_table[p // block_size]`` at
offset ``p % block_size``; its flat slot is ``block * block_size + offset``. Keeping the heads
outside the block makes each (block, head) a contiguous [block_size, head_dim] tile, so
gathered blocks feed a batched matmul without another copy.

Grouped-query attention views the query heads as [num_kv_heads, group, head_dim] and never
repeats K/V.
"""

from __future__ import annotations

import torch


def write_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new K/V into the cache.

    key, value: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens] int64.
    """
    block_size = k_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, :, offsets] = key.to(k_cache.dtype)
    v_cache[blocks, :, offsets] = value.to(v_cache.dtype)


def paged_decode_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence attending to its whole cached context.

    query: [num_seqs, num_heads, head_dim]; block_tables: [num_seqs, max_blocks] int;
    seq_lens: [num_seqs] int (context length including the query token, already cached).
    Returns [num_seqs, num_heads, head_dim].

    NOTE: a per-sequence loop. One batched flash-decoding pass over all (sequence, block)
    pairs was tried and was no faster on a 2-core CPU (32 seqs: 9.8 vs 10.0 ms per layer;
    1 seq: 0.62 vs 0.29 ms): tiny per-block GEMMs and masking stale V rows cost what the loop
    saves. The Triton kernel is where that design belongs.
    """
    out = torch.empty_like(query)
    for i, seq_len in enumerate(seq_lens.tolist()):
        k = _gather(k_cache, block_tables[i], seq_len)
        v = _gather(v_cache, block_tables[i], seq_len)
        out[i] = _attend(query[i : i + 1], k, v, scale)[0]
    return out


def _gather(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The first ``num_tokens`` cached rows of one sequence: [num_kv_heads, num_tokens, head_dim]."""
    block_size = cache.shape[2]
    used = block_table[: (num_tokens + block_size - 1) // block_size]
    blocks = cache.index_select(0, used)  # [nb, Hkv, block_size, D]
    return blocks.transpose(0, 1).flatten(1, 2)[:, :num_tokens]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence: q [q_len, num_heads, head_dim] are the last q_len of the L positions of
    k, v [num_kv_heads, L, head_dim], causal. Returns [q_len, num_heads, head_dim]."""
    q_len, num_heads, head_dim = q.shape
    num_kv_heads, seq_len = k.shape[0], k.shape[1]
    group = num_heads // num_kv_heads
    # Fold the query heads sharing a KV head into the rows of one matmul per KV head.
    qg = q.view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    qg = qg.reshape(num_kv_heads, group * q_len, head_dim)
    scores = torch.matmul(qg, k.to(q.dtype).transpose(1, 2)) * scale  # [Hkv, G*q_len, L]
    if q_len > 1:
        # Query row r sits at position seq_len - q_len + r and sees keys 0..that position.
        future = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device).triu_(
            seq_len - q_len + 1
        )
        scores.view(num_kv_heads, group, q_len, seq_len).masked_fill_(future, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v.to(q.dtype))  # [Hkv, G*q_len, D]
    return out.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3).reshape(
        q_len, num_heads, head_dim
    )


def paged_prefill_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """Variable-length queries packed in one flat batch, causal, over a cached prefix.

    query: [num_tokens, num_heads, head_dim], sequence ``i`` owning rows
    ``query_start_loc[i]:query_start_loc[i+1]``, which are the last tokens of its
    ``seq_lens[i]`` context tokens (all already written to the cache).
    Returns [num_tokens, num_heads, head_dim].
    """
    out = torch.empty_like(query)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        k = _gather(k_cache, block_tables[i], seq_len)
        v = _gather(v_cache, block_tables[i], seq_len)
        out[start:end] = _attend(query[start:end], k, v, scale)
    return out
