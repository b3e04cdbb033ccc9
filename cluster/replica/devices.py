"""Which device a shard runs on: the accelerator Ray assigned to it, never ``cuda:0`` by
assumption, and never the replica actor's view (it holds no GPU).

Ray sets ``CUDA_VISIBLE_DEVICES`` to the ids it assigned an actor, so torch numbers them from 0
in that order; with ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` it does not, and torch sees
the node's devices by their own ids. ``shard_device`` handles both, and refuses clearly when a
shard that asked for a GPU has none (no assignment, or a torch that finds no CUDA device).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class NoDeviceError(RuntimeError):
    """A shard that asked for a GPU cannot use one; the message says why."""


@dataclass(frozen=True)
class CudaProbe:
    """What torch sees of CUDA in this process: the seam tests replace."""

    available: bool
    device_count: int

    @classmethod
    def of_this_process(cls) -> CudaProbe:
        available = torch.cuda.is_available()
        return cls(available, torch.cuda.device_count() if available else 0)


def shard_device(
    use_gpu: bool,
    assigned_gpu_ids: Sequence[str],
    cuda_visible_devices: str | None,
    probe: CudaProbe,
    where: str = "this shard",
) -> torch.device:
    """The device of a shard: the CPU, or the CUDA device Ray assigned it (one per shard)."""
    if not use_gpu:
        return torch.device("cpu")
    if len(assigned_gpu_ids) != 1:
        raise NoDeviceError(
            f"{where} asked Ray for 1 GPU and was assigned {list(assigned_gpu_ids)}; each shard needs exactly one"
        )
    (assigned,) = assigned_gpu_ids
    if not probe.available:
        raise NoDeviceError(
            f"{where} was assigned GPU {assigned} by Ray, but torch finds no CUDA device here "
            f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}): install a CUDA build "
            "of torch on this node, or serve with --device cpu"
        )
    visible = [v.strip() for v in cuda_visible_devices.split(",")] if cuda_visible_devices else None
    if visible is not None:
        if assigned not in visible:
            raise NoDeviceError(
                f"{where} was assigned GPU {assigned} by Ray, which CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} hides"
            )
        index = visible.index(assigned)
    else:
        index = int(assigned)
    if index >= probe.device_count:
        raise NoDeviceError(
            f"{where} was assigned GPU {assigned} (cuda:{index}) but torch sees {probe.device_count} CUDA device(s)"
        )
    return torch.device("cuda", index)
