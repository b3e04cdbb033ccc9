"""What a GPU must support for the dtypes an engine is configured with, checked before any
weight loads.

A dtype the GPU cannot run fails late and forever: Triton compiles a kernel at its first
launch, so an fp8 KV cache on an A100 loads every weight, then fails every step, and a shard
that restarts on failure reloads the weights in a loop. ``check_dtype_support`` is a pure
function of the device and the options, so the process that resolves a config, and every
shard before it loads weights, can refuse up front with an error that names the option, the
compute capability it needs and what to use instead.

What each needs (NVIDIA compute capability):
- ``attention_backend='triton'``: 8.0 (Triton supports Ampere and newer).
- ``dtype='bfloat16'``: 8.0 (bf16 tensor cores; torch and Triton emulate it, slowly, below).
- ``kv_cache_dtype='fp8'`` with the Triton kernels: 8.9 (Triton has ``fp8e4nv`` on Ada,
  Hopper and Blackwell only; below, its kernels do not compile). The torch backend's fp8 casts
  run on any GPU.
- ``quantization='fp8'``: nothing. FP8 matmuls (``torch._scaled_mm``) need 8.9 and a bf16
  model; elsewhere the weights are stored in fp8 and upcast at use (``workers/quantization.py``),
  which runs everywhere, halves the weights' memory and is slower than the model's dtype.
  That is a note to log, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TRITON_MIN_CAPABILITY = (8, 0)
BF16_MIN_CAPABILITY = (8, 0)
FP8_MIN_CAPABILITY = (8, 9)

GPU_FAMILIES: dict[tuple[int, int], str] = {
    (7, 0): "V100",
    (7, 5): "T4, RTX 20xx",
    (8, 0): "A100, A30",
    (8, 6): "A10, A40, RTX 30xx",
    (8, 7): "Jetson Orin",
    (8, 9): "L4, L40S, RTX 40xx",
    (9, 0): "H100, H200",
    (10, 0): "B200",
    (12, 0): "RTX 50xx",
}
"""Example GPUs of each compute capability, for messages when the device's name is unknown."""

_ARCHES = "Ampere, Ada, Hopper, Blackwell"
_FP8_ARCHES = "Ada, Hopper, Blackwell"


@dataclass(frozen=True)
class DtypeSupport:
    """The options run on this device; ``notes`` say what runs slower than it could (log them)."""

    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceInfo:
    kind: str
    """``torch.device.type``: "cuda", "cpu", ...; "rocm" for an AMD GPU (no checks here)."""
    compute_capability: tuple[int, int] | None
    """(major, minor) of an NVIDIA GPU; None elsewhere."""
    name: str | None = None


def describe_gpu(compute_capability: tuple[int, int], device_name: str | None = None) -> str:
    """'8.0 (NVIDIA A100-SXM4-80GB)', or '8.0 (A100, A30)' without a name."""
    major, minor = compute_capability
    label = device_name or GPU_FAMILIES.get((major, minor))
    return f"{major}.{minor}" + (f" ({label})" if label else "")


def check_dtype_support(
    device_kind: str,
    compute_capability: tuple[int, int] | None,
    *,
    kv_cache_dtype: str | torch.dtype,
    quantization: str,
    dtype: str | torch.dtype,
    attention_backend: str,
    device_name: str | None = None,
) -> DtypeSupport:
    """Raise ``ValueError`` naming every option this device cannot run, the compute capability
    it needs and what to use instead; otherwise return the notes worth logging.

    ``kv_cache_dtype``: the option ("auto", "int8", "fp8") or the resolved cache dtype;
    ``dtype``: the model's dtype ("bfloat16" or ``torch.bfloat16``, resolved, not "auto");
    ``attention_backend``: resolved ("torch", "cpu", "triton"). Only NVIDIA GPUs
    (``device_kind`` "cuda") are checked; a CPU runs every combination the engine accepts.
    """
    if device_kind != "cuda":
        return DtypeSupport()
    if compute_capability is None:
        raise ValueError("compute_capability is needed to check a cuda device, got None")
    cc = tuple(compute_capability)
    gpu = describe_gpu(cc, device_name)
    kv, model_dtype = _kv_option(kv_cache_dtype), _dtype_name(dtype)
    problems = []
    if attention_backend == "triton" and cc < TRITON_MIN_CAPABILITY:
        problems.append(
            f"attention_backend 'triton' needs a GPU with compute capability {_v(TRITON_MIN_CAPABILITY)} or newer "
            f"({_ARCHES}); this GPU is {gpu}. Use attention_backend='torch' instead"
        )
    if model_dtype == "bfloat16" and cc < BF16_MIN_CAPABILITY:
        problems.append(
            f"dtype 'bfloat16' needs a GPU with compute capability {_v(BF16_MIN_CAPABILITY)} or newer ({_ARCHES}); "
            f"this GPU is {gpu}. Use dtype='float16' instead"
        )
    if kv == "fp8" and attention_backend == "triton" and cc < FP8_MIN_CAPABILITY:
        problems.append(
            f"kv_cache_dtype 'fp8' needs a GPU with compute capability {_v(FP8_MIN_CAPABILITY)} or newer "
            f"({_FP8_ARCHES}) for Triton's fp8; this GPU is {gpu}. Use kv_cache_dtype='int8' instead"
        )
    if problems:
        raise ValueError("; ".join(problems))
    notes = []
    if quantization == "fp8" and (cc < FP8_MIN_CAPABILITY or model_dtype != "bfloat16"):
        why = (
            f"FP8 matmuls need compute capability {_v(FP8_MIN_CAPABILITY)} or newer; this GPU is {gpu}"
            if cc < FP8_MIN_CAPABILITY
            else f"FP8 matmuls need dtype 'bfloat16', not {model_dtype!r}"
        )
        notes.append(
            f"quantization 'fp8': {why}, so the fp8 weights are upcast at each use "
            "(half the weight memory, slower than unquantized)"
        )
    return DtypeSupport(tuple(notes))


def device_info(device: torch.device | str) -> DeviceInfo:
    """What ``check_dtype_support`` needs to know of ``device``, read from torch (initializes
    CUDA on a cuda device: call it in the process that will use the GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return DeviceInfo(device.type, None)
    if torch.version.hip is not None:
        return DeviceInfo("rocm", None, torch.cuda.get_device_name(device))
    return DeviceInfo("cuda", torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))


def check_device_support(
    device: torch.device | str,
    *,
    kv_cache_dtype: str | torch.dtype,
    quantization: str,
    dtype: str | torch.dtype,
    attention_backend: str,
) -> DtypeSupport:
    """``check_dtype_support`` for a device of this process."""
    info = device_info(device)
    return check_dtype_support(
        info.kind, info.compute_capability, kv_cache_dtype=kv_cache_dtype, quantization=quantization,
        dtype=dtype, attention_backend=attention_backend, device_name=info.name,
    )  # fmt: skip


def _v(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def _kv_option(kv_cache_dtype: str | torch.dtype) -> str:
    if isinstance(kv_cache_dtype, torch.dtype):
        return {torch.float8_e4m3fn: "fp8", torch.int8: "int8"}.get(kv_cache_dtype, "auto")
    return kv_cache_dtype


def _dtype_name(dtype: str | torch.dtype) -> str:
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
