"""Linear layers that know their tensor-parallel slice.

Each layer's ``load(shard, weight)`` takes the *full* checkpoint tensor (or a lazy
safetensors slice, which supports the same indexing) and copies only its own rows or
columns, so a rank never materialises another rank's weights.

NOTE: every method exposes ``weight_t: [in_features, out_features]`` (logically transposed)
and computes ``x @ weight_t``; the memory order under it is the method's
(workers/quantization.py): unquantized weights are [out, in] memory, which kvtide's CPU kernel
for decode rows streams (kernels/cpu_linear.py).

How the weight is stored and applied is the layer's ``method`` (workers/quantization.py):
unquantized by default; ``set_method`` switches to fp8 or int8 storage before loading, and
each ``load`` then quantizes its slice as it arrives, so the full-precision weight of a
quantized layer never exists in memory at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvtide.workers.parallel import SINGLE, TensorParallel
from kvtide.workers.quantization import LinearMethod, Unquantized
from torch import nn


class ColumnParallelLinear(nn.Module):
    """y = x W^T, W split by output rows across ranks; several logical outputs may be merged
    (q/k/v, gate/up) so one matmul serves them all. No communication."""

    def __init__(
        self,
        in_features: int,
        out_features: Sequence[int],
        bias: bool = False,
        tp: TensorParallel = SINGLE,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.full_sizes = list(out_features)
        self.local_sizes = [tp.shard(n, "output features") for n in out_features]
        self.offsets = [sum(self.local_sizes[:i]) for i in range(len(self.local_sizes))]
        total = sum(self.local_sizes)
        self.in_features, self.out_features, self.dtype = in_features, total, dtype
        self.set_method(Unquantized())
        self.bias = (
            nn.Parameter(torch.zeros(total, dtype=dtype), requires_grad=False) if bias else None
        )

    def set_method(self, method: LinearMethod) -> None:
        """(Re)create the weight storage for ``method``; call before ``load``."""
        self.method = method
        method.create(self, self.in_features, self.out_features, self.dtype)

    def load(self, shard: int, weight: Any, is_bias: bool = False) -> None:
        n = self.local_sizes[shard]
        start, offset = self.tp.rank * n, self.offsets[shard]
        if is_bias:
            self.bias[offset : offset + n].copy_(weight[start : start + n])
        else:
            self.method.load_rows(self, weight[start : start + n], offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        return y if self.bias is None else y + self.bias


class RowParallelLinear(nn.Module):
    """y = x W^T, W split by input columns; partial sums are all-reduced across ranks."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        tp: TensorParallel = SINGLE,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.local_in = tp.shard(in_features, "input features")
        self.out_features, self.dtype = out_features, dtype
        self.set_method(Unquantized())
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

    def set_method(self, method: LinearMethod) -> None:
        """(Re)create the weight storage for ``method``; call before ``load``."""
        self.method = method
        method.create(self, self.local_in, self.out_features, self.dtype)

    def load(self, shard: int, weight: Any, is_bias: bool = False) -> None:
        if is_bias:
            self.bias.copy_(weight[:])
            return
        start = self.tp.rank * self.local_in
        self.method.load_rows(self, weight[:, start : start + self.local_in], 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self.method.apply(self, x))
        return y if self.bias is None else y + self.bias
