"""Weight quantization of the linear layers: FP8 (e4m3) and weight-only int8.

Why: a decode step reads every weight once, and the weights are most of a replica's memory.
Storing them in one byte per value halves the memory of an fp16/bf16 model and quarters an
fp32 one, leaving that memory to the KV cache.

Scheme (both formats): symmetric, one fp32 scale per output channel,
``scale[o] = max_i |W[o, i]| / QMAX`` and ``W[o, :] ~= q[o, :] * scale[o]``, so the scale
multiplies the matmul's output column: ``x @ W^T = (x @ q^T) * scale``. Per-output-channel
scales let each merged slice (q/k/v, gate/up) be quantized on its own as it is loaded.

What is quantized: the linear layers of every decoder layer (qkv, o, gate_up, down). The
token embedding and the LM head stay in the model dtype. NOTE: SmolLM2 ties the two, so
quantizing the head would either quantize the embedding lookup too or keep a second copy;
and the head's logits feed sampling directly, where vLLM and llm-compressor also keep full
precision by default.

How each format runs:

- ``fp8`` on CUDA devices with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper) and
  a bf16 model: ``torch._scaled_mm`` with the activations quantized per token on the fly
  (row-wise scales on both operands). Elsewhere (CPU, older GPUs, fp32/fp16 models) the fp8
  weight is upcast to the activation dtype at use: memory still halves (quarters vs fp32),
  but speed does not improve (on this CPU fp8 -> fp32 conversion is slow: decode runs at
  0.1-0.2x fp32).
- ``int8``: upcast to the activation dtype at use, on every device. NOTE: torch's own CPU
  kernel, ``torch.ops.aten._weight_int8pack_mm`` (weight [out, in] int8, scales [out] in the
  activation dtype), is kept as an option (``Int8WeightOnly(int8pack_mm=True)``) but is not
  the default: on this 2-core CPU it is no faster than the upcast for one row and 5-15x
  slower for the 8-128 rows of batched decode and prefill chunks. Neither beats fp32 (the
  upcast decodes at 0.7-0.85x; bench/README.md, "quantized KV cache and weights"), but
  weight memory quarters vs fp32.

Storage: every method keeps ``weight_t`` with the *logical* shape [in_features,
out_features], so loading and tensor-parallel slicing read the same for all of them; the
memory order is the one its kernel wants (``column_major``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from kvtide.kernels import cpu_linear

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
INT8_MAX = 127


def fp8_supported(device: torch.device) -> bool:
    """True on CUDA devices whose tensor cores take FP8 (compute capability >= 8.9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class LinearMethod(Protocol):
    """How a linear layer stores and applies its weight.

    ``create`` registers ``layer.weight_t`` (a Parameter, logical shape [in, out]) and any
    scales, replacing what was there. ``load_rows`` writes output channels
    ``[offset, offset + n)`` from an unquantized [n, in] slice; slices never overlap, so
    each is quantized on its own as it arrives. ``apply`` computes ``x @ W^T`` (no bias).
    """

    name: str

    def create(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None: ...

    def load_rows(self, layer: nn.Module, rows: torch.Tensor, offset: int) -> None: ...

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor: ...


class Unquantized:
    """``weight_t`` [in, out] in the model dtype: a view of [out, in] memory, as ``nn.Linear``
    stores it, applied as ``x @ weight_t``.

    NOTE (layout): fp32 on the CPU runs decode's few rows (up to ``cpu_linear.MAX_ROWS``)
    through kvtide's kernel, which streams each [in] row of the weight once: 1.3-1.7x faster
    than MKL for 2-16 rows (bench/linear_small_m.py). On AVX2 hosts it takes up to 1,024 rows
    (packed panels from 18, 1.2-1.8x MKL at 24-128 rows). Larger batches use MKL, 1-8% slower
    on this layout than on a row-major [in, out] one. For bf16/fp16 this is the very matmul
    transformers runs (``F.linear``), bit for bit on CPU; it is also cuBLAS's usual layout on
    CUDA.
    """

    name = "none"

    def create(self, layer, in_features, out_features, dtype) -> None:
        weight_t = torch.empty(out_features, in_features, dtype=dtype).t()
        layer.weight_t = nn.Parameter(weight_t, requires_grad=False)

    def load_rows(self, layer, rows, offset) -> None:
        layer.weight_t[:, offset : offset + rows.shape[0]].copy_(rows.t())

    def apply(self, layer, x) -> torch.Tensor:
        if x.is_cuda:  # first: on a GPU this Python is part of the step's time (120 calls)
            return x @ layer.weight_t
        weight = layer.weight_t.t()
        if cpu_linear.usable(x, weight):
            return cpu_linear.linear(x, weight)
        sizes = getattr(layer, "local_sizes", ())
        if x.dtype == torch.float32 or len(sizes) < 2:
            return x @ layer.weight_t
        # NOTE: bf16/fp16 on CPU run each merged output (q, k, v; gate, up) as its own matmul,
        # as transformers does: one [in, q+k+v] matmul blocks its reduction differently and
        # rounds ~0.1% of a 333-row prefill's outputs one ulp apart (none at decode's few
        # rows), enough to flip a near-tie token of SmolLM2 bf16 against transformers. On this
        # CPU these dtypes are the checkable path, not the fast one (fp32 is); CUDA stays fused.
        return torch.cat([x @ layer.weight_t[:, o : o + n] for o, n in zip(layer.offsets, sizes, strict=True)], -1)


class _PerChannel:
    """Shared storage and loading of the one-byte formats: ``weight_t`` plus an fp32
    ``weight_scale`` [out] buffer (a buffer, not a Parameter: it is derived at load, never read
    from the checkpoint)."""

    name: str
    qdtype: torch.dtype
    qmax: float

    def __init__(self, column_major: bool = False) -> None:
        # True: ``weight_t`` is [out, in] row-major memory viewed as [in, out].
        self.column_major = column_major

    def create(self, layer, in_features, out_features, dtype) -> None:
        if self.column_major:
            weight_t = torch.empty(out_features, in_features, dtype=self.qdtype).t()
        else:
            weight_t = torch.empty(in_features, out_features, dtype=self.qdtype)
        layer.weight_t = nn.Parameter(weight_t, requires_grad=False)
        layer.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))

    def load_rows(self, layer, rows, offset) -> None:
        n = rows.shape[0]
        q, scale = self.quantize(rows)
        layer.weight_t[:, offset : offset + n].copy_(q.t())
        layer.weight_scale[offset : offset + n].copy_(scale)

    def quantize(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [n, in] -> (q [n, in] in ``qdtype``, scale [n] fp32)."""
        rows = rows.float()
        # An all-zero row gets scale 1 (its q is 0 either way), never a division by zero.
        amax = rows.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / self.qmax, torch.ones_like(amax))
        return self._cast(rows / scale[:, None]), scale

    def _cast(self, scaled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_apply(self, layer, x) -> torch.Tensor:
        """Upcast at use: works on every device and dtype."""
        y = x @ layer.weight_t.to(x.dtype)
        return y * layer.weight_scale.to(y.dtype)


class Fp8PerChannel(_PerChannel):
    name = "fp8"
    qdtype = FP8_DTYPE
    qmax = FP8_MAX

    def __init__(self, scaled_mm: bool = False) -> None:
        # NOTE: _scaled_mm wants its second operand column-major, i.e. [out, in] row-major
        # memory, which is what column_major stores; the upcast path wants [in, out].
        super().__init__(column_major=scaled_mm)
        self.scaled_mm = scaled_mm

    def _cast(self, scaled):
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)

    def apply(self, layer, x) -> torch.Tensor:
        in_features, out_features = layer.weight_t.shape
        if not (
            self.scaled_mm
            and x.dtype == torch.bfloat16
            and in_features % 16 == 0
            and out_features % 16 == 0
        ):
            return self.dequantize_apply(layer, x)
        x2 = x.reshape(-1, in_features)
        # Dynamic per-token activation scales; both operands then carry row-wise scales.
        x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
        xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        y = torch._scaled_mm(
            xq, layer.weight_t, scale_a=x_scale, scale_b=layer.weight_scale[None, :], out_dtype=x.dtype
        )
        return y.reshape(*x.shape[:-1], out_features)


class Int8WeightOnly(_PerChannel):
    name = "int8"
    qdtype = torch.int8
    qmax = INT8_MAX

    def __init__(self, int8pack_mm: bool = False) -> None:
        # NOTE: _weight_int8pack_mm requires a contiguous [out, in] weight: column_major.
        super().__init__(column_major=int8pack_mm)
        self.int8pack_mm = int8pack_mm

    def _cast(self, scaled):
        return scaled.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)

    def apply(self, layer, x) -> torch.Tensor:
        if not self.int8pack_mm:
            return self.dequantize_apply(layer, x)
        in_features, out_features = layer.weight_t.shape
        y = torch.ops.aten._weight_int8pack_mm(
            x.reshape(-1, in_features), layer.weight_t.t(), layer.weight_scale.to(x.dtype)
        )
        return y.reshape(*x.shape[:-1], out_features)


LINEAR_METHODS: dict[str, Callable[[torch.device], LinearMethod]] = {
    "none": lambda device: Unquantized(),
    "fp8": lambda device: Fp8PerChannel(scaled_mm=fp8_supported(device)),
    "int8": lambda device: Int8WeightOnly(),
}
QUANTIZATIONS = tuple(LINEAR_METHODS)


def get_linear_method(quantization: str, device: torch.device | str = "cpu") -> LinearMethod:
    """The method for ``quantization`` with the weights living on ``device``."""
    try:
        make = LINEAR_METHODS[quantization]
    except KeyError:
        raise ValueError(
            f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {quantization!r}"
        ) from None
    return make(torch.device(device))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights: every parameter once (tied ones once) plus the scales."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    scales = sum(
        b.numel() * b.element_size() for name, b in model.named_buffers() if name.endswith("weight_scale")
    )
    return params + scales
