"""The torch paged-attention twin against dense causal attention on unpaged K/V."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvtide.kernels.attention_ref import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    write_kv_ref,
)


def _dense(q, k, v, scale):
    """q: [q_len, H, D] = last q_len positions of k, v: [L, Hkv, D]; causal."""
    q_len, seq_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    mask = torch.ones(q_len, seq_len, dtype=torch.bool).tril(seq_len - q_len)
    return F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale).transpose(0, 1)


def _paged_setup(seq_lens, block_size, num_kv_heads, head_dim, seed=0):
    """Random K/V per sequence, written to a shuffled paged cache through write_kv_ref."""
    g = torch.Generator().manual_seed(seed)
    g_perm = torch.Generator().manual_seed(seed + 1000)
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    k_cache = torch.full((num_blocks, num_kv_heads, block_size, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = torch.randperm(num_blocks, generator=g_perm).tolist()
    tables, ks, vs = [], [], []
    for n, nb in zip(seq_lens, blocks_per_seq):
        table = [perm.pop() for _ in range(nb)]
        k = torch.randn(n, num_kv_heads, head_dim, generator=g)
        v = torch.randn(n, num_kv_heads, head_dim, generator=g)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)])
        write_kv_ref(k, v, k_cache, v_cache, slots)
        tables.append(table)
        ks.append(k)
        vs.append(v)
    width = max(blocks_per_seq)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return k_cache, v_cache, block_tables, ks, vs


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (8, 1)])
def test_decode_matches_dense(block_size, num_heads, num_kv_heads):
    seq_lens = [1, 15, 16, 17, 40]
    k_cache, v_cache, tables, ks, vs = _paged_setup(seq_lens, block_size, num_kv_heads, 32)
    q = torch.randn(len(seq_lens), num_heads, 32)
    out = paged_decode_attention_ref(q, k_cache, v_cache, tables, torch.tensor(seq_lens), 0.2)
    for i in range(len(seq_lens)):
        torch.testing.assert_close(out[i : i + 1], _dense(q[i : i + 1], ks[i], vs[i], 0.2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (9, 3)])
def test_prefill_over_cached_prefix_matches_dense(block_size, num_heads, num_kv_heads):
    seq_lens = [7, 16, 33, 50]
    q_lens = [7, 5, 1, 33]  # whole prompt, chunk over a prefix, single token, chunk
    k_cache, v_cache, tables, ks, vs = _paged_setup(seq_lens, block_size, num_kv_heads, 16, seed=1)
    q = torch.randn(sum(q_lens), num_heads, 16)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    out = paged_prefill_attention_ref(q, k_cache, v_cache, tables, starts, seq_lens, 0.25)
    for i in range(len(seq_lens)):
        a, b = starts[i], starts[i + 1]
        torch.testing.assert_close(out[a:b], _dense(q[a:b], ks[i], vs[i], 0.25), atol=1e-5, rtol=1e-5)


def test_block_size_one_and_sixteen_agree():
    seq_lens = [20, 3]
    outs = []
    for block_size in (1, 16):
        k_cache, v_cache, tables, _, _ = _paged_setup(seq_lens, block_size, 2, 8, seed=3)
        q = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(4))
        outs.append(paged_decode_attention_ref(q, k_cache, v_cache, tables, torch.tensor(seq_lens), 0.3))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)


def test_prefill_reads_the_new_keys_of_a_whole_prompt_and_gathers_the_rest():
    # key/value are the batch's new rows; a whole-prompt chunk attends to them, a chunk over a
    # cached prefix must still gather its prefix from the cache.
    seq_lens, q_lens = [7, 16, 50], [7, 5, 50]
    k_cache, v_cache, tables, ks, vs = _paged_setup(seq_lens, 16, 3, 16, seed=5)
    q = torch.randn(sum(q_lens), 9, 16, generator=torch.Generator().manual_seed(6))
    starts = [0, 7, 12, 62]
    new_k = torch.cat([k[-n:] for k, n in zip(ks, q_lens)])
    new_v = torch.cat([v[-n:] for v, n in zip(vs, q_lens)])
    want = paged_prefill_attention_ref(q, k_cache, v_cache, tables, starts, seq_lens, 0.25)
    got = paged_prefill_attention_ref(q, k_cache, v_cache, tables, starts, seq_lens, 0.25, key=new_k, value=new_v)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # The whole prompts read key/value, not the cache: poisoning the cache changes only the
    # sequence whose chunk has a cached prefix.
    k_cache.fill_(float("nan"))
    got = paged_prefill_attention_ref(q, k_cache, v_cache, tables, starts, seq_lens, 0.25, key=new_k, value=new_v)
    torch.testing.assert_close(got[:7], want[:7], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[12:], want[12:], atol=1e-6, rtol=1e-6)
    assert got[7:12].isnan().all()
