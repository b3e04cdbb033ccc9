"""The compiled CPU ops against their torch twins: values, in-place effects and bad shapes."""

from __future__ import annotations

import pytest
import torch

from kvtide.kernels import cpu_ops
from kvtide.kernels.attention_ref import write_kv_ref
from kvtide.kernels.norm_rope_ref import rms_norm_ref, silu_and_mul_ref

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="no C++ compiler for the CPU ops")


@pytest.mark.parametrize("num_tokens", [1, 3, 200])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_add_rms_norm_matches_the_twin(num_tokens, with_residual):
    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, 576, generator=g) * 3
    residual = torch.randn(num_tokens, 576, generator=g) if with_residual else None
    weight = torch.rand(576, generator=g) + 0.5
    want, want_res = rms_norm_ref(x, weight, 1e-5, residual)
    res_in = residual.clone() if with_residual else None
    got, got_res = cpu_ops.fused_add_rms_norm(x, weight, 1e-5, res_in)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    assert torch.equal(got_res, want_res)  # the sum is exact either way
    if with_residual:
        assert got_res is res_in  # updated in place


def qkv_views(num_tokens: int, heads: int, kv_heads: int, d: int, g: torch.Generator):
    """q, k, v as strided views of one merged projection output, as the model makes them."""
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * d, generator=g)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    return q.view(num_tokens, heads, d), k.view(num_tokens, kv_heads, d), v.view(num_tokens, kv_heads, d)


@pytest.mark.parametrize("num_tokens", [1, 5, 300])
def test_rotary_matches_the_twin_on_strided_views(num_tokens):
    g = torch.Generator().manual_seed(num_tokens)
    q, k, _ = qkv_views(num_tokens, 9, 3, 64, g)
    table = torch.randn(2, 512, 64, generator=g)
    positions = torch.randint(0, 512, (num_tokens,), generator=g)
    want_q, want_k = q.clone(), k.clone()
    cpu_ops.rotary_embedding_ref(want_q, want_k, positions, table[0], table[1])
    cpu_ops.rotary_embedding(q, k, positions, table[0], table[1])
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_rotary_twin_equals_the_models_rotate_half_form():
    from kvtide.workers.layers.rotary import RotaryEmbedding, apply_rotary

    g = torch.Generator().manual_seed(0)
    rope = RotaryEmbedding(64, 128, 10000.0)
    q, k = torch.randn(7, 4, 64, generator=g), torch.randn(7, 2, 64, generator=g)
    positions = torch.tensor([0, 1, 2, 50, 51, 100, 127])
    want_q, want_k = apply_rotary(q, k, *rope.cos_sin(positions, torch.float32))
    cpu_ops.rotary_embedding_ref(q, k, positions, rope.cos, rope.sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


@pytest.mark.parametrize("num_tokens", [1, 6, 100])
def test_write_kv_matches_the_twin(num_tokens):
    g = torch.Generator().manual_seed(num_tokens)
    _, k, v = qkv_views(num_tokens, 9, 3, 64, g)
    slots = torch.randperm(32 * 16, generator=g)[:num_tokens]
    caches = [torch.full((32, 3, 16, 64), float("nan")) for _ in range(4)]
    write_kv_ref(k, v, caches[0], caches[1], slots)
    cpu_ops.write_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0].nan_to_num(7.0), caches[2].nan_to_num(7.0))
    assert torch.equal(caches[1].nan_to_num(7.0), caches[3].nan_to_num(7.0))


def test_bad_inputs_name_the_problem():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"x must be \[num_tokens, 16\], got \(2, 8\)"):
        cpu_ops.fused_add_rms_norm(x, torch.ones(16), 1e-5)
    k = torch.randn(2, 1, 4)
    cache = torch.zeros(2, 1, 4, 4)
    with pytest.raises(RuntimeError, match=r"slot_mapping\[1\] is 8; slots must be in \[0, 8\)"):
        cpu_ops.write_kv(k, k, cache, cache.clone(), torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"cos/sin must be \[max_position, 4\]"):
        cpu_ops.rotary_embedding(k, k, torch.tensor([0, 1]), torch.zeros(3, 6), torch.zeros(3, 6))


@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize("half", [1536, 37])
def test_silu_and_mul_is_torchs_bit_for_bit(num_tokens, half):
    # 37: a tail after the whole vectors; 300 x 1536: torch splits the work across threads.
    g = torch.Generator().manual_seed(num_tokens * half)
    wide = torch.randn(num_tokens, 2 * half + 3, generator=g) * 4
    x = wide[:, : 2 * half]  # rows with a stride, as a view of a wider output would have
    assert torch.equal(cpu_ops.silu_and_mul(x), silu_and_mul_ref(x))
    with pytest.raises(ValueError, match=r"x must be \[n, 2 \* h\]"):
        cpu_ops.silu_and_mul(torch.randn(2, 5))
