"""Argument checks shared by the Triton kernel launchers.

A Triton kernel given a wrong stride or dtype reads garbage or faults far from the cause, so
every launcher checks its tensors first and raises a ``ValueError`` naming the argument, what
it got and what it needs.

NOTE: the checks read shapes, strides, dtypes and devices, and the host-side ints a launcher is
given, never a value in device memory: on a GPU every such read is a host sync (and breaks
CUDA graph capture). Values only the device holds (sequence lengths, offsets, slots) are the
producer's contract, which each launcher documents; the torch twins check them on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_tensor(
    name: str,
    t: torch.Tensor,
    *,
    dim: int,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    unit_last_stride: bool = True,
) -> None:
    """``shape`` entries of None are free; the last dimension must be contiguous by default.

    NOTE: a launcher checks ~20 tensors, ~600 a decode step of a 30-layer model; on a GPU that
    Python is the step's time (the kernels take ~1 ms of ~20), so messages are built only on
    failure. Building them eagerly was a quarter of an H200 decode step's profile.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} has dtype {t.dtype}; allowed: {allowed}")
    if shape is not None and not all(s is None or s == g for s, g in zip(shape, t.shape)):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if unit_last_stride and t.stride(-1) != 1 and t.numel() > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def check_host_int(name: str, value: object, lo: int, hi: int, bounds: str = "") -> int:
    """A Python int in ``[lo, hi]`` (``bounds`` says where they come from), prepared on the
    host: a tensor here would be read back from the device, so it is refused, not converted."""
    check(
        isinstance(value, int) and not isinstance(value, bool),
        f"{name} must be a Python int prepared on the host, got {type(value).__name__}",
    )
    check(lo <= value <= hi, f"{name} must be in [{lo}, {hi}]{bounds}, got {value}")
    return value


def check_head_dim(head_dim: int) -> None:
    check(
        16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0,
        f"head_dim must be a power of two in [16, 256], got {head_dim}",
    )


def check_device(kernel, **tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device, and one this kernel can run on: CUDA when compiled, CPU
    under ``TRITON_INTERPRET=1`` (read when the kernel module was imported)."""
    given = {name: t.device for name, t in tensors.items() if t is not None}
    devices = set(given.values())
    check(len(devices) == 1, f"tensors must be on one device, got {given}")
    device = devices.pop()
    if isinstance(kernel, InterpretedFunction):
        check(device.type == "cpu", f"the Triton interpreter runs on CPU tensors, got {device}")
    else:
        check(
            device.type == "cuda",
            f"compiled Triton kernels need CUDA tensors, got {device} "
            "(set TRITON_INTERPRET=1 before importing kvtide.kernels to run them on CPU)",
        )
    return device
