"""The compiled CPU decode kernel against its pure-torch twin."""

from __future__ import annotations

import pytest
import torch

from kvtide.kernels import cpu_attention
from kvtide.kernels.attention_ref import paged_decode_attention_ref
from tests.unit.test_attention_ref import _paged_setup

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C++ toolchain to build the kernel")


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 64), (9, 3, 64), (8, 1, 128), (6, 2, 16)])
def test_matches_the_torch_twin(block_size, num_heads, num_kv_heads, head_dim):
    seq_lens = [1, 15, 16, 17, 33, 100]
    k_cache, v_cache, tables, _, _ = _paged_setup(seq_lens, block_size, num_kv_heads, head_dim, seed=5)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(6))
    lens = torch.tensor(seq_lens)
    want = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, head_dim**-0.5)
    got = cpu_attention.paged_decode_attention_cpu(q, k_cache, v_cache, tables, lens, head_dim**-0.5)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_rejects_what_it_cannot_compute():
    k_cache = torch.zeros(4, 2, 16, 8)
    with pytest.raises(ValueError, match="float32"):
        cpu_attention.paged_decode_attention_cpu(
            torch.zeros(1, 4, 8, dtype=torch.float16), k_cache, k_cache, torch.zeros(1, 1, dtype=torch.long),
            torch.ones(1, dtype=torch.long), 1.0,
        )
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        cpu_attention.paged_decode_attention_cpu(
            torch.zeros(1, 3, 8), k_cache, k_cache, torch.zeros(1, 1, dtype=torch.long),
            torch.ones(1, dtype=torch.long), 1.0,
        )
