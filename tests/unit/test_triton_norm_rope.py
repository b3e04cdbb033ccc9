"""Fused RMSNorm (+ residual) and rotary kernels against their twins, and the twins against
the model's own layers. Tolerances: fp32 1e-5; fp16 2e-3 and bf16 2e-2 relative (the kernels
round once from fp32, the layers after each op)."""

from __future__ import annotations

# Sets TRITON_INTERPRET before the kernel modules are imported.
from tests.unit.triton_env import DEVICES

# isort: split
import pytest
import torch

from kvtide.kernels import cpu_ops
from kvtide.kernels.triton_norm_rope import (
    rms_norm,
    rms_norm_ref,
    rotary_embedding,
    rotary_embedding_ref,
)
from kvtide.workers.layers.norm import RMSNorm
from kvtide.workers.layers.rotary import RotaryEmbedding, apply_rotary

TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden,with_residual", [(64, False), (96, True)])
def test_rms_norm_matches_twin_and_layer(device, dtype, hidden, with_residual, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, hidden, generator=g) * 3).to(dtype)
    residual = torch.randn(5, hidden, generator=g).to(dtype) if with_residual else None
    layer = RMSNorm(hidden, 1e-5)
    with torch.no_grad():
        layer.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=g))
    layer = layer.to(dtype)
    want, want_res = rms_norm_ref(x, layer.weight.detach(), 1e-5, residual)
    clone = lambda t: None if t is None else t.clone()  # the compiled CPU path adds into it in place
    compiled = layer(x, clone(residual))[0]  # fp32 on CPU: kernels/cpu_ops.py
    torch.testing.assert_close(compiled, want, **TOL[dtype])
    monkeypatch.setattr(cpu_ops, "usable", lambda *tensors: False)
    torch.testing.assert_close(want, layer(x, clone(residual))[0], atol=0, rtol=0)  # the layer's torch path
    to = lambda t: None if t is None else t.to(device)
    got, got_res = rms_norm(to(x), to(layer.weight.detach()), 1e-5, to(residual))
    assert not got.isnan().any()
    torch.testing.assert_close(got.cpu(), want, **TOL[dtype])
    torch.testing.assert_close(got_res.cpu(), want_res, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 64), (9, 3, 128), (8, 1, 64)])
def test_rotary_matches_twin_and_layer(device, dtype, num_heads, num_kv_heads, head_dim):
    g = torch.Generator().manual_seed(1)
    positions = torch.tensor([0, 1, 7, 16, 17, 300])
    q = torch.randn(6, num_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(6, num_kv_heads, head_dim, generator=g).to(dtype)
    cos, sin = RotaryEmbedding(head_dim, 512, 10000.0).cos_sin(positions, dtype)
    want = rotary_embedding_ref(q, k, cos, sin)
    for w, layer_out in zip(want, apply_rotary(q, k, cos, sin)):
        torch.testing.assert_close(w, layer_out, atol=0, rtol=0)
    got = rotary_embedding(*(t.to(device) for t in (q, k, cos, sin)))
    for gt, w in zip(got, want):
        assert not gt.isnan().any()
        torch.testing.assert_close(gt.cpu(), w, **TOL[dtype])


def test_launchers_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\)"):
        rms_norm(torch.zeros(2, 64), torch.ones(32), 1e-5)
    with pytest.raises(ValueError, match="residual has dtype torch.float16"):
        rms_norm(torch.zeros(2, 64), torch.ones(64), 1e-5, torch.zeros(2, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        rotary_embedding(torch.zeros(2, 1, 48), torch.zeros(2, 1, 48), torch.zeros(2, 1, 48), torch.zeros(2, 1, 48))
