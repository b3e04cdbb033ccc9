"""A shard's device comes from what Ray assigned it, never cuda:0 by assumption."""

from __future__ import annotations

import re

import pytest
import torch

from kvtide.cluster.replica.devices import CudaProbe, NoDeviceError, shard_device

TWO_GPUS = CudaProbe(available=True, device_count=2)


def test_a_cpu_shard_runs_on_the_cpu_whatever_the_node_has():
    assert shard_device(False, ["3"], "3", TWO_GPUS) == torch.device("cpu")


@pytest.mark.parametrize(
    ("assigned", "visible", "count", "expected"),
    [
        (["1"], "1", 1, "cuda:0"),  # Ray narrowed CUDA_VISIBLE_DEVICES to the assignment
        (["5"], "4,5", 2, "cuda:1"),  # a visible list wider than the assignment
        (["1"], None, 2, "cuda:1"),  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: ids are torch's
        (["GPU-abc"], "GPU-abc", 1, "cuda:0"),  # UUIDs work as well
    ],
)
def test_the_device_is_the_one_ray_assigned(assigned, visible, count, expected):
    assert shard_device(True, assigned, visible, CudaProbe(True, count)) == torch.device(expected)


@pytest.mark.parametrize(
    ("assigned", "visible", "probe", "needle"),
    [
        ([], None, TWO_GPUS, "was assigned []; each shard needs exactly one"),
        (["0", "1"], "0,1", TWO_GPUS, "was assigned ['0', '1']"),
        (["0"], "0", CudaProbe(False, 0), "but torch finds no CUDA device here"),
        (["2"], "0,1", TWO_GPUS, "which CUDA_VISIBLE_DEVICES='0,1' hides"),
        (["3"], None, TWO_GPUS, "torch sees 2 CUDA device(s)"),
    ],
)
def test_a_shard_without_a_usable_gpu_refuses_naming_why(assigned, visible, probe, needle):
    with pytest.raises(NoDeviceError, match=r"^shard \(stage 1, tp_rank 0\).*" + re.escape(needle)):
        shard_device(True, assigned, visible, probe, where="shard (stage 1, tp_rank 0)")
