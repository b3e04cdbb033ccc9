"""The CPU linear kernel against torch's matmul: every tile shape of the few-row path, the
packed panels (AVX2 hosts, 18 rows and more) with their row and column tails and row chunks,
strided rows, the layers that use it, and bad inputs."""

from __future__ import annotations

import pytest
import torch

from kvtide.kernels import cpu_linear
from kvtide.workers.layers.embedding import ParallelLMHead
from kvtide.workers.layers.linear import ColumnParallelLinear

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="no C++ compiler for the CPU linear kernel")


# Every row count of the few-row tiles, then panel blocks of 6 rows with every remainder, and
# more rows than a panel chunk (512); each only where the kernel takes that many rows.
ROWS = [r for r in (*range(1, 25), 29, 48, 67, 130, 515) if r <= cpu_linear.MAX_ROWS]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (1536, 576), (37, 7), (5, 1), (64, 49)])
def test_matches_matmul_for_every_row_count_and_tail(rows, in_features, out_features):
    # 37, 5: K not a multiple of any vector width; 7, 49, 1: N not a multiple of the tile (or
    # of a 16-row panel).
    g = torch.Generator().manual_seed(rows * 1000 + in_features)
    x = torch.randn(rows, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g)
    got = cpu_linear.linear(x, w)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    torch.testing.assert_close(got, x @ w.t(), rtol=1e-5, atol=1e-4 * in_features**0.5)


@pytest.mark.parametrize("rows", [1, 2, 6])
def test_rows_with_a_stride_are_read_in_place(rows):
    # The attention output and merged projections hand the layers strided row views (1 and 2
    # rows: the one-stream path on AVX2 and AVX-512 builds; 6: the tiles).
    g = torch.Generator().manual_seed(rows)
    wide = torch.randn(rows, 1000, generator=g)
    x = wide[:, 100:676]  # [rows, 576], row stride 1000
    w = torch.randn(300, 576, generator=g)
    torch.testing.assert_close(cpu_linear.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-3)


def test_column_parallel_linear_and_lm_head_use_it_and_agree_with_matmul():
    g = torch.Generator().manual_seed(1)
    layer = ColumnParallelLinear(96, [64, 32, 32])
    weights = [torch.randn(n, 96, generator=g) for n in (64, 32, 32)]
    for shard, w in enumerate(weights):
        layer.load(shard, w)
    assert layer.weight_t.t().is_contiguous()  # [out, in] memory: what the kernel streams
    full = torch.cat(weights)
    for rows in (1, 17, 40, cpu_linear.MAX_ROWS, cpu_linear.MAX_ROWS + 1):  # the kernel, then MKL
        x = torch.randn(rows, 96, generator=g)
        assert cpu_linear.usable(x, layer.weight_t.t()) == (rows <= cpu_linear.MAX_ROWS)
        torch.testing.assert_close(layer(x), x @ full.t(), rtol=1e-5, atol=1e-4)
    head = ParallelLMHead(1000, 96)
    head.load(0, torch.randn(1000, 96, generator=g))
    for rows in (1, 7, 40):
        h = torch.randn(rows, 96, generator=g)
        torch.testing.assert_close(head.compute_logits(h), h @ head.weight.t(), rtol=1e-5, atol=1e-4)


def test_bad_inputs_name_the_problem():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="same K"):
        cpu_linear.linear(x, torch.randn(4, 9))
    with pytest.raises(ValueError, match="x must be a float32 CPU tensor"):
        cpu_linear.linear(x.double(), w)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        cpu_linear.linear(x, torch.randn(8, 4).t())
    assert not cpu_linear.usable(x.bfloat16(), w)  # bf16/fp16 stay with torch's matmul
    assert not cpu_linear.usable(torch.randn(cpu_linear.MAX_ROWS + 1, 8), w)
