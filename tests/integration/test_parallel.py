"""Tensor and pipeline parallelism on a real two-node Ray cluster on 127.0.0.1 (CPU, gloo).

Every parallel shape must give the single-shard logits for the same steps, place each stage's
TP ranks on one node and PP stages on different nodes, talk over loopback only, and leave no
process behind. The steps come from a real Scheduler (chunked prefill, then decodes) driven
by greedy sampling on the single-shard reference.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
import ray
import torch

from kvtide.cluster.replica.executor import RayExecutor
from kvtide.cluster.replica.placement import PlacementError, ReplicaShape
from kvtide.workers.config import EngineConfig, SchedulerConfig, resolve
from kvtide.workers.kv_cache_manager import KVCacheManager
from kvtide.workers.model_loader import load_model, read_hf_config
from kvtide.workers.model_runner import plan_delta, prepare_inputs
from kvtide.workers.request import Request, RequestId, RequestStatus
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.scheduler import Scheduler
from kvtide.workers.shard import ShardRunner
from kvtide.workers.step_inputs import ChunkDelta, DeltaTracker, SamplingSpec, StepDelta, StepInputs

from tests.tiny import write_tiny_llama

# About a minute on 2 cores: each shape starts its shards (torch import, gloo rendezvous).
pytestmark = pytest.mark.slow

LOOPBACK = "127.0.0.1"
NUM_BLOCKS, BLOCK_SIZE = 32, 4
TOLERANCE = {"atol": 5e-5, "rtol": 1e-5}
"""fp32; TP all-reduces change the summation order: seen up to 2e-5 on logits of size ~10
(PP alone is bit-exact)."""
STARTUP_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 15.0
PROMPTS = {"a": [5, 9, 17, 3, 44, 60, 7, 12, 30, 2, 81], "b": [70, 8, 19, 33, 4, 52, 11]}
MODELS = {  # heads / kv heads: TP 2 fits the default, TP 4 needs 8 / 4
    "h4": {"num_layers": 4},
    "h8": {"num_heads": 8, "num_kv_heads": 4, "num_layers": 4},
}
SHAPES = [  # (model, tp, pp)
    ("h4", 2, 1),
    ("h8", 4, 1),
    ("h4", 1, 2),
    ("h4", 2, 2),
]


class Replica(NamedTuple):
    model: str
    """Key into MODELS and into the ``steps`` fixture."""
    executor: RayExecutor


class Step(NamedTuple):
    inputs: StepInputs
    delta: StepDelta
    """What the driver sends the shards for this step."""
    logits: torch.Tensor
    """The single-shard reference logits of this step."""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    return {name: write_tiny_llama(root / name, **overrides) for name, overrides in MODELS.items()}


@pytest.fixture(scope="module")
def steps(models) -> dict[str, list[Step]]:
    return {name: reference_steps(model_dir) for name, model_dir in models.items()}


def reference_steps(model_dir: Path, max_tokens: int = 4) -> list[Step]:
    """Chunked prefill of two prompts, then decodes, greedy on the single-shard logits."""
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8)
    scheduler = Scheduler(config, KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, False), lambda r, i: RequestId(f"{r}#{i}"))
    for rid, prompt in PROMPTS.items():
        scheduler.add(Request(RequestId(rid), prompt, SamplingParams(max_tokens=max_tokens)))
    runner = ShardRunner(load_model(model_dir), NUM_BLOCKS, BLOCK_SIZE)
    tracker = DeltaTracker()
    steps = []
    while scheduler.num_unfinished:
        assert len(steps) < 20, "scheduler made no progress"
        plan = scheduler.schedule()
        inputs = prepare_inputs(plan, BLOCK_SIZE, torch.device("cpu"))
        logits = runner.forward(inputs)
        steps.append(Step(inputs, dataclasses.replace(plan_delta(tracker, plan), return_logits=True), logits))
        sampling = [c.request for c in plan.chunks if c.sample]
        for request, token in zip(sampling, logits.argmax(dim=-1).tolist(), strict=True):
            request.append_output_token(token)
            if request.num_output_tokens >= max_tokens:
                scheduler.finish(request, RequestStatus.FINISHED_LENGTH)
                tracker.forget(request.request_id)
        scheduler.complete(plan)
    return steps


def executor_config(model_dir, **options):
    """The resolved config a replica hands its executor; the torch attention path, as the
    single shard it is compared with."""
    config = EngineConfig.from_kwargs(
        model=str(model_dir), num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, attention_backend="torch", **options
    )
    return resolve(config, str(model_dir), read_hf_config(model_dir))


@pytest.fixture(scope="module", params=SHAPES, ids=[f"{m}-tp{tp}-pp{pp}" for m, tp, pp in SHAPES])
def replica(request, cluster, models):
    """One executor per shape, shared by the tests below in definition order.
    NOTE: the last test of this module shuts it down; teardown is then a no-op."""
    name, tp, pp = request.param
    wait_nodes_idle(cluster)
    executor = RayExecutor(executor_config(models[name]), ReplicaShape(tp, pp), STARTUP_TIMEOUT_S)
    yield Replica(name, executor)
    executor.shutdown()


def wait_nodes_idle(cluster, timeout_s: float = 30.0) -> None:
    """Until every node has all its CPUs free again. The previous shape's placement groups are
    removed asynchronously; a stage's node hint is soft, so a shape placed while a node still
    looks full packs onto the other one and the spread below would not be tested (CI saw
    tp1-pp2 land both stages on one node right after tp4 had filled a node)."""
    totals = {n["NodeID"]: n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]}
    deadline = time.monotonic() + timeout_s
    while True:
        free = {node: res.get("CPU", 0.0) for node, res in ray._private.state.available_resources_per_node().items()}
        if all(free.get(node, 0.0) >= total for node, total in totals.items()):
            return
        assert time.monotonic() < deadline, f"CPUs still held {timeout_s} s after the last shape: free {free}, total {totals}"
        time.sleep(0.1)


def is_loopback(ip: str) -> bool:
    return ip in (LOOPBACK, "::1", f"::ffff:{LOOPBACK}")


# -- the cluster ---------------------------------------------------------------------------


def test_every_node_is_on_loopback(cluster):
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    assert [n["NodeManagerAddress"] for n in nodes] == [LOOPBACK, LOOPBACK]


def test_tp_that_does_not_divide_heads_fails_before_any_actor(cluster, models):
    groups_before = len(ray.util.placement_group_table())
    with pytest.raises(ValueError) as info:
        RayExecutor(executor_config(models["h4"]), ReplicaShape(3, 1), STARTUP_TIMEOUT_S)
    message = str(info.value)
    assert "tensor-parallel size 3" in message
    assert "num_attention_heads=4, num_key_value_heads=2" in message
    assert "allowed tensor-parallel sizes: 1, 2" in message
    assert len(ray.util.placement_group_table()) == groups_before


def test_stage_larger_than_any_node_fails_naming_it(cluster, models):
    with pytest.raises(PlacementError, match=r"a stage needs \{'CPU': 8\.0\} on one node, the largest node has \{'CPU': 4\.0\}"):
        RayExecutor(executor_config(models["h8"]), ReplicaShape(4, 1, cpus_per_shard=2), STARTUP_TIMEOUT_S)


# -- each parallel shape ---------------------------------------------------------------------


def test_logits_match_single_shard(replica, steps):
    reference = steps[replica.model]
    assert len(reference) >= 4
    assert any(s.inputs.meta.num_decode_tokens for s in reference)  # decodes were covered too
    for i, step in enumerate(reference):
        logits = replica.executor.execute(step.delta)
        torch.testing.assert_close(logits, step.logits, **TOLERANCE, msg=lambda m: f"step {i}: {m}")


def test_each_stage_packs_its_tp_ranks_on_one_node_and_stages_spread(replica):
    tp, pp = replica.executor.shape.tp, replica.executor.shape.pp
    nodes = replica.executor.worker_nodes()
    assert sorted(nodes) == [(s, r) for s in range(pp) for r in range(tp)]
    stage_nodes = [{nodes[(s, r)] for r in range(tp)} for s in range(pp)]
    assert all(len(n) == 1 for n in stage_nodes)
    assert [n.pop() for n in stage_nodes] == list(replica.executor.placement.stage_nodes)
    assert len(set(replica.executor.placement.stage_nodes)) == pp  # two nodes, so PP=2 spreads


def test_shards_talk_over_loopback_only(replica):
    for shard, pid in replica.executor.worker_pids().items():
        addresses = [
            a.ip for c in psutil.Process(pid).net_connections(kind="inet") for a in (c.laddr, c.raddr) if a
        ]
        assert addresses, f"shard {shard} has no sockets"
        assert all(is_loopback(ip) for ip in addresses), f"shard {shard}: {addresses}"


def test_failed_shard_raises_and_shutdown_leaves_no_process(replica, steps):
    spec = SamplingSpec(SamplingParams(), 0, (1, 2, 3))
    bad_block = ChunkDelta("bad", 0, (1, 2, 3), True, keep_blocks=0, new_blocks=(NUM_BLOCKS + 5,), spec=spec)
    bad = StepDelta((bad_block,), ())
    with pytest.raises(RuntimeError, match=r"shard \(stage 0, tp_rank \d\) failed the step"):
        replica.executor.execute(bad)
    pids = list(replica.executor.worker_pids().values())
    replica.executor.shutdown()
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while (alive := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"shard processes still running after shutdown: {alive}"
    assert not ray.util.placement_group_table() or all(
        g["state"] == "REMOVED" for g in ray.util.placement_group_table().values()
    )


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_quantized_kv_cache_and_weights_reach_every_shard(cluster, models):
    """int8 KV cache and int8 weights through PP=2 give the single shard's logits with the
    same cache dtype and weights (so the shards really allocate int8 caches and quantize).
    NOTE: PP, not TP: a row-parallel slice has its own per-channel scales, so TP int8
    weights are not the single shard's."""
    model_dir = models["h4"]
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8)
    scheduler = Scheduler(config, KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, False), lambda r, i: RequestId(f"{r}#{i}"))
    for rid, prompt in PROMPTS.items():
        scheduler.add(Request(RequestId(rid), prompt, SamplingParams(max_tokens=3)))
    local = ShardRunner(load_model(model_dir, quantization="int8"), NUM_BLOCKS, BLOCK_SIZE, kv_dtype=torch.int8)
    tracker = DeltaTracker()
    with RayExecutor(
        executor_config(model_dir, kv_cache_dtype="int8", quantization="int8"), ReplicaShape(1, 2), STARTUP_TIMEOUT_S
    ) as executor:
        while scheduler.num_unfinished:
            plan = scheduler.schedule()
            want = local.forward(prepare_inputs(plan, BLOCK_SIZE, torch.device("cpu")))
            got = executor.execute(dataclasses.replace(plan_delta(tracker, plan), return_logits=True))
            torch.testing.assert_close(got, want, **TOLERANCE)
            for request, token in zip([c.request for c in plan.chunks if c.sample], want.argmax(-1).tolist(), strict=True):
                request.append_output_token(token)
                if request.num_output_tokens >= 3:
                    scheduler.finish(request, RequestStatus.FINISHED_LENGTH)
                    tracker.forget(request.request_id)
            scheduler.complete(plan)
