"""GPU placement on Ray nodes that declare fake GPUs: each shard takes the device Ray assigned
it (read from its own assignment, never cuda:0 by assumption), and a shard whose node has no
usable CUDA refuses to start with an error that says so. The CUDA seam: ``CudaProbe``."""

from __future__ import annotations

import pytest
import ray
import torch

from kvtide.cluster.replica.devices import CudaProbe
from kvtide.cluster.replica.executor import RayExecutor
from kvtide.cluster.replica.placement import ReplicaShape, place_replica
from kvtide.cluster.replica.shard_actor import ShardActor
from kvtide.cluster.replica.spec import ShardSpec
from kvtide.workers import EngineConfig, resolve
from kvtide.workers.model_loader import read_hf_config
from tests.integration.conftest import LOOPBACK
from tests.tiny import write_tiny_llama

# NOTE: torch.cuda answers for the real machine at collection (tests/conftest.py hides CUDA
# only while a test runs): on a machine with real GPUs, Ray would hand the shards real devices.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="fake GPUs on a machine with real ones"),
]

TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def gpu_node(cluster):
    """A third node with 2 fake GPUs (Ray only counts them); removed afterwards."""
    node = cluster.add_node(num_cpus=2, num_gpus=2, node_ip_address=LOOPBACK)
    cluster.wait_for_nodes()
    yield node
    cluster.remove_node(node)


@pytest.fixture(scope="module")
def cuda_config(tmp_path_factory):
    model_dir = write_tiny_llama(tmp_path_factory.mktemp("gpu") / "tiny")
    config = EngineConfig.from_kwargs(model=str(model_dir), device="cuda", num_blocks=16, block_size=4)
    return resolve(config, str(model_dir), read_hf_config(model_dir))


def test_each_shard_resolves_its_device_from_its_own_assignment(gpu_node, cuda_config):
    shape = ReplicaShape(tp=2, pp=1, use_gpu=True)
    placement = place_replica(shape, TIMEOUT_S, "gpu-test")
    shards = [
        ray.remote(ShardActor).options(scheduling_strategy=placement.scheduling_strategy(0, r), **shape.actor_options)
        .remote(ShardSpec(cuda_config, 2, 1, 0, r, LOOPBACK, use_gpu=True))
        for r in range(2)
    ]
    try:
        assignments = ray.get([s.gpu_assignment.remote() for s in shards], timeout=TIMEOUT_S)
        assert sorted(ids[0] for ids, _ in assignments) == ["0", "1"]  # one GPU each, distinct
        for ids, visible in assignments:
            assert visible == ids[0]  # Ray narrowed CUDA_VISIBLE_DEVICES to the assignment
        # With a CUDA seam that sees the node's GPUs, each resolves the one it was given: what
        # torch numbers 0 within its narrowed view.
        devices = ray.get([s.resolve_device.remote(CudaProbe(True, 1)) for s in shards], timeout=TIMEOUT_S)
        assert devices == ["cuda:0", "cuda:0"]
    finally:
        for s in shards:
            ray.kill(s)
        placement.remove()


def test_a_gpu_replica_on_a_node_without_cuda_fails_to_start_saying_so(gpu_node, cuda_config):
    """This machine has no CUDA: the fake GPUs are only Ray's bookkeeping, as on a node whose
    torch has no CUDA build."""
    with pytest.raises(Exception, match=r"was assigned GPU \d by Ray, but torch finds no CUDA device here"):
        RayExecutor(cuda_config, ReplicaShape(tp=2, pp=1, use_gpu=True), timeout_s=TIMEOUT_S)
    assert all(g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())  # nothing held
