"""Triton KV write, flash-decoding and prefill kernels against their torch twins.

Under ``TRITON_INTERPRET=1`` on CPU tensors here; the ``cuda`` cases run the compiled kernels.
Tolerances (max abs/rel error vs the twin): fp32 1e-5 (both compute in fp32; only the
summation order differs); fp16 2e-3 (fp16 dot operands, fp32 accumulation, vs the twin's fp16
matmuls); bf16 2e-2 (bf16 dot operands, the softmax weights rounded to bf16, fp32 accumulation,
under the interpreter the same rounded values dotted in fp32; the twin in bf16). Quantized
caches compare exactly on write (same codes, same scales) and at fp32 tolerance on attention
(both dequantize the same codes).
"""

from __future__ import annotations

# Sets TRITON_INTERPRET before the kernel modules are imported.
from tests.unit.triton_env import DEVICES

# isort: split
import pytest
import torch

from kvtide.kernels.attention_ref import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    write_kv_ref,
)
from kvtide.kernels.kv_quant import allocate_kv_cache, split_kv_cache
from kvtide.kernels.triton_decode import dot_config, paged_decode_attention
from kvtide.kernels.triton_kv_write import write_kv
from kvtide.kernels.triton_prefill import paged_prefill_attention

TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}
QUANT = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def _kernel_body():  # a function for the test below to wrap as a compiled kernel (never launched)
    pass


@pytest.mark.parametrize(
    "dtype,compiled,interpreted",
    [
        (torch.float32, "fp32", "fp32"),
        (torch.float16, "fp16", "fp16"),
        (torch.bfloat16, "bf16", "bf16-as-fp32"),
    ],
)
def test_dot_operands_are_the_query_dtype_and_bf16_is_emulated_only_by_the_interpreter(dtype, compiled, interpreted):
    # bf16 once went to the dots as fp32 (TF32 on a GPU): 5.6% of an H200's bf16 matmul rate.
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    assert dot_config(dtype, JITFunction(_kernel_body)) == compiled
    assert dot_config(dtype, InterpretedFunction(_kernel_body)) == interpreted


def lens_for(block_size: int) -> list[int]:
    """1, odd, exactly one and two blocks, and just across a block boundary."""
    return [1, 7, block_size, block_size + 1, 2 * block_size, 2 * block_size + 5]


def make_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype, device, kv_dtype=None, seed=0):
    """Random K/V per sequence written through the twin into shuffled blocks. Returns
    (k_cache, v_cache, k_scale, v_scale, block_tables, key, value, slot_mapping)."""
    g = torch.Generator().manual_seed(seed)
    # K/V first, so the same seed gives the same rows whatever the block size.
    key = torch.randn(sum(seq_lens), num_kv_heads, head_dim, generator=g).to(dtype)
    value = torch.randn(sum(seq_lens), num_kv_heads, head_dim, generator=g).to(dtype)
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 2
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots = [], []
    for n, nb in zip(seq_lens, per_seq):
        table = [perm.pop() for _ in range(nb)]
        slots += [table[p // block_size] * block_size + p % block_size for p in range(n)]
        tables.append(table + [0] * (max(per_seq) - nb))
    store = kv_dtype or dtype
    k_buf = allocate_kv_cache(num_blocks, num_kv_heads, block_size, head_dim, store)
    v_buf = allocate_kv_cache(num_blocks, num_kv_heads, block_size, head_dim, store)
    k_cache, k_scale = split_kv_cache(k_buf, head_dim)
    v_cache, v_scale = split_kv_cache(v_buf, head_dim)
    slot_mapping = torch.tensor(slots)
    write_kv_ref(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    to = lambda t: None if t is None else t.to(device)
    k_buf, v_buf = k_buf.to(device), v_buf.to(device)
    k_cache, k_scale = split_kv_cache(k_buf, head_dim)
    v_cache, v_scale = split_kv_cache(v_buf, head_dim)
    return (k_cache, v_cache, k_scale, v_scale, torch.tensor(tables).to(device),
            to(key), to(value), to(slot_mapping))


def poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan"))


def on(device, *lists: list[int]) -> tuple[torch.Tensor, ...]:
    """Host lists as the int64 device tensors the launchers read (``AttentionMetadata``'s)."""
    return tuple(torch.tensor(x, dtype=torch.int64, device=device) for x in lists)


# -- KV write ------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("store", [torch.float32, torch.float16, torch.bfloat16, "int8", "fp8"])
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", [(16, 3, 64), (32, 1, 128)])
def test_write_kv_matches_twin(device, store, block_size, num_kv_heads, head_dim):
    kv_dtype = QUANT.get(store)
    dtype = torch.float16 if kv_dtype is not None else store
    seq_lens = lens_for(block_size)
    want_k, want_v, want_ks, want_vs, _, key, value, slots = make_cache(
        seq_lens, block_size, num_kv_heads, head_dim, dtype, device, kv_dtype
    )
    # A padding token (slot -1) must not be written anywhere.
    key = torch.cat([key, torch.full_like(key[:1], 1e4)])
    value = torch.cat([value, torch.full_like(value[:1], 1e4)])
    slots = torch.cat([slots, torch.tensor([-1], device=slots.device)])
    if kv_dtype is None:
        k_cache, v_cache = poisoned(want_k), poisoned(want_v)
        k_scale = v_scale = None
        write_kv(key, value, k_cache, v_cache, slots)
        # Unused slots stay NaN in both; every used slot is written and exact.
        torch.testing.assert_close(k_cache, _nan_where_unused(want_k, slots), atol=0, rtol=0, equal_nan=True)
        torch.testing.assert_close(v_cache, _nan_where_unused(want_v, slots), atol=0, rtol=0, equal_nan=True)
        return
    k_cache, v_cache = torch.zeros_like(want_k), torch.zeros_like(want_v)
    k_scale, v_scale = poisoned(want_ks), poisoned(want_vs)
    write_kv(key, value, k_cache, v_cache, slots, k_scale, v_scale)
    for got, want in ((k_cache, want_k), (v_cache, want_v)):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    used = _used_mask(want_ks, slots)
    torch.testing.assert_close(k_scale[used], want_ks[used], atol=0, rtol=0)
    torch.testing.assert_close(v_scale[used], want_vs[used], atol=0, rtol=0)
    assert k_scale[~used].isnan().all()


def _used_mask(scale_shaped: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    num_blocks, num_kv_heads, block_size = scale_shaped.shape[:3]
    used = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=slots.device)
    used[slots[slots >= 0]] = True
    return used.view(num_blocks, 1, block_size).expand(num_blocks, num_kv_heads, block_size)


def _nan_where_unused(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    out = cache.clone()
    out[~_used_mask(cache, slots)] = float("nan")
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_rounding_carries_into_the_exponent(device):
    """Values whose rounding carries into the next binade (the interpreter's own cast gets
    these wrong), ties, and subnormals round exactly as torch's cast."""
    row = torch.tensor([448.0, 125.6, -124.35, 31.84, 15.5, 0.01, -0.0123, 1e-4, 0.0, 3.0]
                       + [0.5] * 54)
    key = row.view(1, 1, 64)
    k_cache = torch.zeros(1, 1, 1, 64, dtype=torch.float8_e4m3fn)
    k_scale = torch.zeros(1, 1, 1)
    v_cache, v_scale = k_cache.clone(), k_scale.clone()
    want = k_cache.clone()
    write_kv_ref(key, key, want, want.clone(), torch.tensor([0]), k_scale.clone(), k_scale.clone())
    k_cache, v_cache, k_scale, v_scale, key = (t.to(device) for t in (k_cache, v_cache, k_scale, v_scale, key))
    write_kv(key, key, k_cache, v_cache, torch.tensor([0], device=device), k_scale, v_scale)
    assert torch.equal(k_cache.cpu().view(torch.uint8), want.view(torch.uint8))
    assert k_cache.cpu().float()[0, 0, 0, 1].item() == 128.0


# -- decode --------------------------------------------------------------------------------

DECODE_CASES = [
    # block_size, num_heads, num_kv_heads, head_dim, dtype, num_splits
    (16, 4, 4, 64, torch.float32, 1),
    (16, 9, 3, 128, torch.float32, 3),
    (32, 8, 1, 64, torch.float32, 4),
    (32, 4, 4, 128, torch.float16, 1),
    (16, 6, 2, 64, torch.float16, 5),
    (16, 8, 1, 128, torch.bfloat16, 2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim,dtype,num_splits", DECODE_CASES)
def test_decode_matches_twin(device, block_size, num_heads, num_kv_heads, head_dim, dtype, num_splits):
    seq_lens = lens_for(block_size)
    k_cache, v_cache, _, _, tables, _, _, _ = make_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype, device)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    lens = torch.tensor(seq_lens)
    want = paged_decode_attention_ref(q, k_cache.cpu(), v_cache.cpu(), tables.cpu(), lens, head_dim**-0.5)
    out = poisoned(q).to(device)
    got = paged_decode_attention(q.to(device), k_cache, v_cache, tables, lens.to(device), head_dim**-0.5,
                                 num_splits=num_splits, out=out, max_seq_len=max(seq_lens))
    assert got is out and not got.isnan().any()
    torch.testing.assert_close(got.cpu(), want, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv", ["int8", "fp8"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_quantized_decode_matches_twin(device, kv, num_splits):
    seq_lens = lens_for(16)
    k_cache, v_cache, ks, vs, tables, _, _, _ = make_cache(seq_lens, 16, 2, 64, torch.float32, device, QUANT[kv])
    q = torch.randn(len(seq_lens), 6, 64, generator=torch.Generator().manual_seed(1))
    lens = torch.tensor(seq_lens)
    want = paged_decode_attention_ref(q, k_cache.cpu(), v_cache.cpu(), tables.cpu(), lens, 0.125, ks.cpu(), vs.cpu())
    got = paged_decode_attention(q.to(device), k_cache, v_cache, tables, lens.to(device), 0.125, ks, vs,
                                 num_splits=num_splits, out=poisoned(q).to(device), max_seq_len=max(seq_lens))
    torch.testing.assert_close(got.cpu(), want, **TOL[torch.float32])


# -- prefill -------------------------------------------------------------------------------

PREFILL_CASES = [
    # block_size, num_heads, num_kv_heads, head_dim, dtype
    (16, 4, 4, 64, torch.float32),
    (32, 9, 3, 128, torch.float32),
    (16, 8, 1, 64, torch.float16),
    (32, 6, 2, 64, torch.bfloat16),
]


def prefill_shape(block_size):
    """(seq_lens, query lengths): a whole prompt, a one-token chunk, chunks over a cached
    prefix ending on and across block boundaries, an odd chunk, and an empty prefix of 1."""
    seq_lens = [2 * block_size + 5, 9, 2 * block_size, block_size + 1, 1]
    q_lens = [2 * block_size + 5, 1, block_size + 3, 7, 1]
    return seq_lens, q_lens


def run_prefill(device, block_size, num_heads, num_kv_heads, head_dim, dtype, kv_dtype=None):
    seq_lens, q_lens = prefill_shape(block_size)
    k_cache, v_cache, ks, vs, tables, _, _, _ = make_cache(
        seq_lens, block_size, num_kv_heads, head_dim, dtype, device, kv_dtype)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], num_heads, head_dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    cpu = lambda t: None if t is None else t.cpu()
    want = paged_prefill_attention_ref(q, k_cache.cpu(), v_cache.cpu(), tables.cpu(), qsl, seq_lens,
                                       head_dim**-0.5, cpu(ks), cpu(vs))
    out = poisoned(q).to(device)
    got = paged_prefill_attention(q.to(device), k_cache, v_cache, tables, *on(device, qsl, seq_lens),
                                  head_dim**-0.5, ks, vs, out=out, max_query_len=max(q_lens),
                                  max_seq_len=max(seq_lens))
    assert got is out and not got.isnan().any()
    return got.cpu(), want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim,dtype", PREFILL_CASES)
def test_prefill_matches_twin(device, block_size, num_heads, num_kv_heads, head_dim, dtype):
    got, want = run_prefill(device, block_size, num_heads, num_kv_heads, head_dim, dtype)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantized_prefill_matches_twin(device, kv):
    got, want = run_prefill(device, 16, 6, 2, 64, torch.float32, QUANT[kv])
    torch.testing.assert_close(got, want, **TOL[torch.float32])


# -- metamorphic: the block size changes where rows live, not the result --------------------

@pytest.mark.parametrize("device", DEVICES)
def test_block_size_1_and_16_agree(device):
    seq_lens, q_lens = [40, 17, 1], [40, 3, 1]
    g = torch.Generator().manual_seed(3)
    q_dec = torch.randn(3, 6, 64, generator=g).to(device)
    q_pre = torch.randn(sum(q_lens), 6, 64, generator=g).to(device)
    qsl = [0, 40, 43, 44]
    outs = []
    for block_size in (1, 16):
        k_cache, v_cache, _, _, tables, _, _, _ = make_cache(seq_lens, block_size, 2, 64, torch.float32, device, seed=7)
        lens = torch.tensor(seq_lens, device=device)
        outs.append((paged_decode_attention(q_dec, k_cache, v_cache, tables, lens, 0.125, num_splits=2, max_seq_len=40),
                     paged_prefill_attention(q_pre, k_cache, v_cache, tables, *on(device, qsl, seq_lens), 0.125,
                                             max_query_len=40, max_seq_len=40)))
    (dec1, pre1), (dec16, pre16) = outs
    torch.testing.assert_close(dec1, dec16, **TOL[torch.float32])
    torch.testing.assert_close(pre1, pre16, **TOL[torch.float32])


# -- launcher checks -----------------------------------------------------------------------

def test_launchers_reject_bad_arguments():
    k_cache = torch.zeros(4, 2, 16, 64)
    tables, lens = torch.zeros(1, 2, dtype=torch.long), torch.tensor([5])
    q = torch.zeros(1, 6, 64)
    decode = lambda q, k, v, t, l, **kw: paged_decode_attention(q, k, v, t, l, 1.0, **{"max_seq_len": 5, **kw})
    with pytest.raises(ValueError, match="query has dtype torch.int32"):
        decode(q.int(), k_cache, k_cache, tables, lens)
    with pytest.raises(ValueError, match=r"multiple of num_kv_heads \(2\)"):
        decode(torch.zeros(1, 5, 64), k_cache, k_cache, tables, lens)
    with pytest.raises(ValueError, match=r"max_seq_len must be in \[1, 32\] \(block_tables width x block_size\), got 33"):
        decode(q, k_cache, k_cache, tables, lens, max_seq_len=33)
    with pytest.raises(ValueError, match=r"max_seq_len must be in \[1, 32\].*got 0"):
        decode(q, k_cache, k_cache, tables, lens, max_seq_len=0)
    with pytest.raises(ValueError, match="max_seq_len must be a Python int prepared on the host, got Tensor"):
        decode(q, k_cache, k_cache, tables, lens, max_seq_len=lens.max())
    with pytest.raises(ValueError, match="seq_lens has dtype torch.float32"):
        decode(q, k_cache, k_cache, tables, lens.float())
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        decode(torch.zeros(1, 6, 48), torch.zeros(4, 2, 16, 48), torch.zeros(4, 2, 16, 48), tables, lens)
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        int8 = torch.zeros(4, 2, 16, 64, dtype=torch.int8)
        decode(q, int8, int8, tables, lens)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        decode(q.transpose(0, 2).contiguous().transpose(0, 2), k_cache, k_cache, tables, lens)

    qsl = torch.tensor([0, 3])
    prefill = lambda q, qsl, l, **kw: paged_prefill_attention(
        q, k_cache, k_cache, tables, qsl, l, 1.0, **{"max_query_len": 3, "max_seq_len": 5, **kw})
    with pytest.raises(ValueError, match="query_start_loc must be a torch.Tensor, got list"):
        prefill(torch.zeros(3, 6, 64), [0, 3], lens)
    with pytest.raises(ValueError, match=r"query_start_loc must have shape \(2,\), got \(3,\)"):
        prefill(torch.zeros(3, 6, 64), torch.tensor([0, 1, 3]), lens)
    with pytest.raises(ValueError, match=r"max_query_len must be in \[1, 3\] \(num_tokens\), got 4"):
        prefill(torch.zeros(3, 6, 64), qsl, lens, max_query_len=4)
    with pytest.raises(ValueError, match=r"max_seq_len must be in \[3, 32\].*got 2"):
        prefill(torch.zeros(3, 6, 64), qsl, lens, max_seq_len=2)
    with pytest.raises(ValueError, match=r"max_seq_len must be in \[3, 32\].*got 40"):
        prefill(torch.zeros(3, 6, 64), qsl, lens, max_seq_len=40)
    with pytest.raises(ValueError, match="max_query_len must be a Python int prepared on the host, got float"):
        prefill(torch.zeros(3, 6, 64), qsl, lens, max_query_len=3.0)
    with pytest.raises(ValueError, match="slot_mapping must have shape"):
        write_kv(torch.zeros(3, 2, 64), torch.zeros(3, 2, 64), k_cache, k_cache, torch.zeros(2, dtype=torch.long))


# -- values that break the producer's contract stay inside the cache -----------------------

@pytest.mark.parametrize("device", DEVICES)
def test_lengths_past_the_block_table_are_clamped_to_it(device):
    """The launchers never read lengths back, so a length past the block table's width (the
    producer's bug) must cost a wrong answer, not a read past the table: the kernels clamp it
    to the width, which is what the twin computes for that width."""
    block_size, width = 16, 2
    k_cache, v_cache, _, _, tables, _, _, _ = make_cache([32, 32], block_size, 2, 64, torch.float32, device)
    q = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(4))
    want = paged_decode_attention_ref(q, k_cache.cpu(), v_cache.cpu(), tables.cpu(), torch.tensor([32, 32]), 0.125)
    (lens,) = on(device, [32, 32 + 1000])
    got = paged_decode_attention(q.to(device), k_cache, v_cache, tables, lens, 0.125, max_seq_len=width * block_size)
    torch.testing.assert_close(got.cpu(), want, **TOL[torch.float32])

    qp = torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(5))
    want = paged_prefill_attention_ref(qp, k_cache.cpu(), v_cache.cpu(), tables.cpu(), [0, 2, 4], [32, 32], 0.125)
    got = paged_prefill_attention(qp.to(device), k_cache, v_cache, tables, *on(device, [0, 2, 4], [32, 32 + 1000]),
                                  0.125, max_query_len=2, max_seq_len=32)
    torch.testing.assert_close(got.cpu(), want, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_write_kv_drops_slots_past_the_cache(device):
    k_cache = torch.zeros(2, 1, 4, 16, device=device)
    v_cache = torch.zeros_like(k_cache)
    key = torch.ones(3, 1, 16, device=device)
    (slots,) = on(device, [1, 8, 7])  # slot 8 is one past the last of 2 blocks x 4
    write_kv(key, key, k_cache, v_cache, slots)
    written = k_cache.view(8, 16)[:, 0].cpu()
    assert written.tolist() == [0, 1, 0, 0, 0, 0, 0, 1]
