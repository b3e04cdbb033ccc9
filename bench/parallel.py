"""Tensor and pipeline parallelism on CPU (gloo over loopback, Ray actors), SmolLM2-135M fp32.

Prints, in one run on a two-node Ray cluster on 127.0.0.1 started here:
  (1) decode step time (num_seqs sequences, prompt_len-token prompts, median of the timed
      steady-state decode steps) in-process on one ShardRunner, and through RayExecutor at
      TP=1, TP=3 and PP=2, all replaying the same steps;
  (2) communication per step: gloo all_reduce / all_gather / send+recv of the step's sizes
      timed in probe actors, times the collectives a step makes; and the rough upper bound
      (TP=3 step) - (TP=1 step) / 3;
  (3) pipeline efficiency without micro-batching: PP=2 vs PP=1 decode tokens/s on the same
      cores, and each stage's busy fraction (its forward timed in-process on its layer slice,
      over the PP=2 step wall time through Ray).

Run:  .venv/bin/python bench/parallel.py [--threads T] [--num-seqs N] [--steps S]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import socket
import statistics
import time
from datetime import timedelta
from typing import NamedTuple

from kvtide.cluster.threads import configure_threads


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="driver intra-op threads (default: kvtide's choice)")
    p.add_argument("--num-seqs", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3, help="decode steps run before timing")
    p.add_argument("--steps", type=int, default=10, help="timed decode steps (the median is reported)")
    p.add_argument("--comm-iters", type=int, default=50, help="iterations per communication timing")
    p.add_argument("--engine-seqs", type=int, default=8, help="requests per engine run in section (4)")
    p.add_argument("--engine-tokens", type=int, default=24, help="greedy tokens per request in section (4)")
    p.add_argument("--engine-rounds", type=int, default=3, help="rounds of section (4), taken in turns")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


# NOTE: both must be set before their library loads: Ray resolves its node IP at import, and
# OpenMP reads its thread settings once, when torch loads.
ARGS = parse_args()
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
NUM_THREADS = configure_threads(ARGS.threads)

import ray
import torch
import torch.distributed as dist

from kvtide.cluster.replica.executor import RayExecutor
from kvtide.cluster.replica.placement import ReplicaShape
from kvtide.workers.attention import default_attention_backend
from kvtide.workers.config import (
    EngineConfig,
    SchedulerConfig,
    resolve,
)
from kvtide.workers.engine import Engine
from kvtide.workers.kv_cache_manager import KVCacheManager
from kvtide.workers.model_files import resolve_model
from kvtide.workers.model_loader import load_model, read_hf_config
from kvtide.workers.model_runner import plan_delta, prepare_inputs
from kvtide.workers.models.llama import LlamaArgs
from kvtide.workers.request import Request, RequestId
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.scheduler import Scheduler
from kvtide.workers.shard import ShardRunner, stage_layers
from kvtide.workers.step_inputs import DeltaTracker, StepDelta, StepInputs
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

MODEL = "smollm2-135m"
LOOPBACK = "127.0.0.1"
CPUS_PER_NODE = 4
BLOCK_SIZE = 16
STARTUP_TIMEOUT_S = 300.0
TP1 = ReplicaShape(1, 1, cpus_per_shard=2)  # a shard's intra-op threads = its CPUs (Ray sets OMP_NUM_THREADS)
GROUPS = {  # replicas that run side by side, taking turns step by step, so load drift hits all alike
    "TP": {  # NOTE: main() unpacks this order: TP=3, TP=1 x 2 threads, TP=1 x 1 thread
        "TP=3 PP=1, 3 shards x 1 thread": ReplicaShape(3, 1, cpus_per_shard=1),
        "TP=1 PP=1, 1 shard x 2 threads": TP1,
        "TP=1 PP=1, 1 shard x 1 thread": ReplicaShape(1, 1, cpus_per_shard=1),
    },
    "PP": {
        "TP=1 PP=1, 1 shard x 2 threads": TP1,
        "TP=1 PP=2, 2 stages x 2 threads": ReplicaShape(1, 2, cpus_per_shard=2),
    },
}
"""Both groups fit the 2 x 4 logical CPUs of the cluster (6 each); all shards share the real cores."""


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


@contextlib.contextmanager
def env_without(*names: str):
    """Hide ``names`` from processes started inside (the Ray nodes, hence every worker)."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# -- the steps ---------------------------------------------------------------------------


def make_steps(model_dir, backend: str, num_blocks: int) -> tuple[list, list[torch.Tensor], ShardRunner]:
    """One prefill of every prompt, then decodes, greedy on the in-process single shard.
    Returns (step inputs, reference logits, that shard)."""
    rng = random.Random(ARGS.seed)
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=ARGS.num_seqs, max_num_batched_tokens=ARGS.num_seqs * ARGS.prompt_len),
        KVCacheManager(num_blocks, BLOCK_SIZE, False),
        lambda r, i: RequestId(f"{r}#{i}"),
    )
    for i in range(ARGS.num_seqs):
        prompt = [rng.randrange(100, 40000) for _ in range(ARGS.prompt_len)]
        scheduler.add(Request(RequestId(str(i)), prompt, SamplingParams(max_tokens=1000)))
    runner = ShardRunner(load_model(model_dir), num_blocks, BLOCK_SIZE, attention_backend=backend)
    tracker = DeltaTracker()
    steps, logits_all = [], []
    for _ in range(1 + ARGS.warmup + ARGS.steps):
        plan = scheduler.schedule()
        inputs = prepare_inputs(plan, BLOCK_SIZE, torch.device("cpu"))
        logits = runner.forward(inputs)
        steps.append(Step(inputs, dataclasses.replace(plan_delta(tracker, plan), return_logits=True)))
        scheduler.complete(plan)
        logits_all.append(logits)
        sampling = [c.request for c in plan.chunks if c.sample]
        for request, token in zip(sampling, logits.argmax(dim=-1).tolist(), strict=True):
            request.append_output_token(token)
    assert steps[0].inputs.meta.num_decode_tokens == 0 and steps[1].inputs.meta.num_decode_tokens == ARGS.num_seqs
    return steps, logits_all, runner


class Step(NamedTuple):
    inputs: StepInputs
    """The packed batch, for the in-process forwards."""
    delta: StepDelta
    """What the driver sends the shards."""


def replay(forward, steps, reference) -> tuple[list[float], float]:
    """Run every step through ``forward``: (step seconds, max |logits - reference|)."""
    times, max_diff = [], 0.0
    for step, ref in zip(steps, reference, strict=True):
        t0 = time.perf_counter()
        logits = forward(step.inputs)
        times.append(time.perf_counter() - t0)
        max_diff = max(max_diff, (logits - ref).abs().max().item())
    return times, max_diff


class StageChain:
    """The PP stages in-process, each on its own layer slice and KV cache, run one after the
    other; ``forward`` records each stage's seconds in ``times[stage]``."""

    def __init__(self, model_dir, backend: str, num_blocks: int, bounds: list[tuple[int, int]]) -> None:
        self.runners = [
            ShardRunner(load_model(model_dir, layer_start=s, layer_end=e), num_blocks, BLOCK_SIZE, attention_backend=backend)
            for s, e in bounds
        ]
        self.times: list[list[float]] = [[] for _ in self.runners]

    @torch.inference_mode()
    def forward(self, inputs) -> torch.Tensor:
        hidden = residual = None
        for r, times in zip(self.runners, self.times, strict=True):
            t0 = time.perf_counter()
            hidden, residual = r.model(
                inputs.input_ids, inputs.positions, r.kv_caches, inputs.meta, r.backend, hidden, residual
            )
            if r.model.is_last:
                logits = r.model.compute_logits(hidden[inputs.logits_indices])
            times.append(time.perf_counter() - t0)
        return logits


class Run(NamedTuple):
    startup_s: float
    times: list[float]
    """Seconds per step."""
    max_diff: float
    """Max |logits - in-process logits| over all steps."""


def run_group(model_dir, shapes: dict[str, ReplicaShape], backend, num_blocks, steps, reference, local: dict) -> dict[str, Run]:
    """Start every replica of ``shapes``, then run the steps on them and on the in-process
    ``local`` forwards in turns (step i everywhere before step i + 1, starting one later each step)."""
    with contextlib.ExitStack() as stack:
        forwards = {label: (lambda step, f=f: f(step.inputs)) for label, f in local.items()}
        startup = dict.fromkeys(local, 0.0)
        for label, shape in shapes.items():
            t0 = time.perf_counter()
            config = EngineConfig.from_kwargs(model=str(model_dir), num_blocks=num_blocks, block_size=BLOCK_SIZE,
                                              attention_backend=backend)  # fmt: skip
            resolved = resolve(config, str(model_dir), read_hf_config(model_dir))
            ex = stack.enter_context(RayExecutor(resolved, shape, STARTUP_TIMEOUT_S))
            forwards[label], startup[label] = (lambda step, ex=ex: ex.execute(step.delta)), time.perf_counter() - t0
        labels = list(forwards)
        times = {label: [] for label in labels}
        diffs = dict.fromkeys(labels, 0.0)
        for i, (inputs, ref) in enumerate(zip(steps, reference, strict=True)):
            for label in labels[i % len(labels):] + labels[:i % len(labels)]:
                t0 = time.perf_counter()
                logits = forwards[label](inputs)
                times[label].append(time.perf_counter() - t0)
                diffs[label] = max(diffs[label], (logits - ref).abs().max().item())
    return {label: Run(startup[label], times[label], diffs[label]) for label in labels}


# -- communication probes ----------------------------------------------------------------


class CommProbe:
    """One rank of a gloo group on loopback that times collectives of given shapes."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self._listener: socket.socket | None = None

    def num_threads(self) -> tuple[int, str | None]:
        return torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY")

    def echo(self, inputs) -> None:
        """An empty step: what one actor call with the step's inputs costs."""

    def rendezvous_address(self) -> tuple[str, int]:
        self._listener = socket.create_server((LOOPBACK, 0))
        return LOOPBACK, self._listener.getsockname()[1]

    def init(self, address: tuple[str, int], tp_ranks: list[int], timeout_s: float) -> None:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(
            *address, self.world_size, is_master=self.rank == 0, timeout=timeout,
            master_listen_fd=self._listener.detach() if self.rank == 0 else None,
        )
        dist.init_process_group("gloo", store=store, world_size=self.world_size, rank=self.rank, timeout=timeout)
        self.tp_group = dist.new_group(tp_ranks)
        self.in_tp = self.rank in tp_ranks

    def collective(self, op: str, shape: tuple[int, ...], iters: int) -> list[float]:
        """Seconds per call of all_reduce or all_gather over the TP group ([] off the group)."""
        if not self.in_tp:
            return []
        x = torch.randn(shape)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(self.tp_group))]
        times = []
        dist.barrier(group=self.tp_group)
        for _ in range(iters + 3):
            t0 = time.perf_counter()
            if op == "all_reduce":
                dist.all_reduce(x, group=self.tp_group)
            else:
                dist.all_gather(parts, x, group=self.tp_group)
            times.append(time.perf_counter() - t0)
        return times[3:]

    def ping_pong(self, peer: int, shape: tuple[int, ...], iters: int, leader: bool) -> list[float]:
        """Round trips of what a stage boundary sends (hidden, then residual): the leader
        sends both and receives both back. Seconds per round trip, on the leader."""
        hidden, residual = torch.randn(shape), torch.randn(shape)
        times = []
        for _ in range(iters + 3):
            t0 = time.perf_counter()
            if leader:
                dist.send(hidden, peer), dist.send(residual, peer)
                dist.recv(hidden, peer), dist.recv(residual, peer)
            else:
                dist.recv(hidden, peer), dist.recv(residual, peer)
                dist.send(hidden, peer), dist.send(residual, peer)
            times.append(time.perf_counter() - t0)
        return times[3:] if leader else []

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


ENGINE_RUNS = [  # (label, shape key, steps in flight)
    ("PP=1, 1 shard x 2 threads", "pp1", 1),
    ("PP=2, 2 stages x 2 threads, no micro-batching", "pp2", 1),
    ("PP=2, 2 stages x 2 threads, 2 micro-batches", "pp2", 2),
]
ENGINE_SHAPES = {"pp1": ReplicaShape(1, 1, cpus_per_shard=2), "pp2": ReplicaShape(1, 2, cpus_per_shard=2)}


def engine_runs(model_dir, backend: str) -> dict[str, tuple[list[float], list[float]]]:
    """Decode tok/s of the real engine on each of ENGINE_RUNS (rounds taken in turns; both PP=2
    runs share one set of shards), and each stage's busy fraction over the last round:
    (execute time - pipeline send/recv wait) / wall, from the steady decode phase."""
    rng = random.Random(ARGS.seed + 1)
    num_blocks = ARGS.engine_seqs * -(-(ARGS.prompt_len + ARGS.engine_tokens) // BLOCK_SIZE) + 1
    config = EngineConfig.from_kwargs(
        model=str(model_dir), num_blocks=num_blocks, block_size=BLOCK_SIZE, attention_backend=backend,
        max_num_seqs=ARGS.engine_seqs, max_num_batched_tokens=ARGS.engine_seqs * ARGS.prompt_len,
        enable_prefix_caching=False,
    )
    resolved = resolve(config, str(model_dir), read_hf_config(model_dir))
    params = SamplingParams(temperature=0.0, max_tokens=ARGS.engine_tokens, ignore_eos=True)
    out = {label: ([], []) for label, _, _ in ENGINE_RUNS}
    with contextlib.ExitStack() as stack:
        executors = {
            key: stack.enter_context(RayExecutor(resolved, shape, STARTUP_TIMEOUT_S))
            for key, shape in ENGINE_SHAPES.items()
        }
        for r in range(ARGS.engine_rounds):
            prompts = [[rng.randrange(100, 40000) for _ in range(ARGS.prompt_len)] for _ in range(ARGS.engine_seqs)]
            for label, key, depth in ENGINE_RUNS:
                ex = executors[key]
                ex.max_in_flight = depth  # read once, by the Engine built next
                engine = Engine(resolved, ex)
                for i, prompt in enumerate(prompts):
                    engine.add_request(f"r{r}-{i}", prompt, params)
                started, first, tokens = None, set(), 0
                while engine.has_unfinished_requests():
                    for d in engine.step():
                        if started is not None:
                            tokens += len(d.token_ids)
                        first.add(d.request_id)
                    if started is None and len(first) == ARGS.engine_seqs:
                        before = ex.timings()  # NOTE: a step in flight may straddle this point
                        started = time.perf_counter()
                wall = time.perf_counter() - started
                after = ex.timings()
                busy = []
                for stage in range(ex.shape.pp):
                    (e0, w0), (e1, w1) = before[(stage, 0)], after[(stage, 0)]
                    busy.append(((e1 - e0) - (w1 - w0)) / wall)
                out[label] = (out[label][0] + [tokens / wall], busy)
    return out


def comm_times(node_ids: list[str], num_tokens: int, vocab_per_rank: int, step_inputs) -> tuple[dict[str, list[float]], tuple]:
    """Seconds per call of each communication a decode step makes, timed on 4 probe ranks:
    ranks 0-2 on node 0 form the TP group, rank 3 on node 1 is rank 0's next PP stage.
    Also returns a 1-CPU and a 2-CPU actor's (intra-op threads, OMP_WAIT_POLICY)."""
    remote = ray.remote(CommProbe)
    nodes = [node_ids[0]] * 3 + [node_ids[1]]
    probes = [
        remote.options(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(r, 4)
        for r, n in enumerate(nodes)
    ]
    try:
        address = ray.get(probes[0].rendezvous_address.remote())
        ray.get([p.init.remote(address, [0, 1, 2], STARTUP_TIMEOUT_S) for p in probes], timeout=STARTUP_TIMEOUT_S)
        iters, out = ARGS.comm_iters, {}

        def collective(op, shape):
            per_rank = ray.get([p.collective.remote(op, shape, iters) for p in probes])
            return [max(t) for t in zip(*per_rank[:3])]  # a call ends when its last rank does

        def hop(shape):  # one way = half a round trip
            r = ray.get([probes[0].ping_pong.remote(3, shape, iters, True), probes[3].ping_pong.remote(0, shape, iters, False)])
            return [t / 2 for t in r[0]]

        mib_tokens = 1024 * 1024 // (4 * 576)
        out["all_reduce 1 x 576 (2.3 KiB)"] = collective("all_reduce", (1, 576))
        out[f"all_reduce {num_tokens} x 576 (decode step)"] = collective("all_reduce", (num_tokens, 576))
        out[f"all_reduce {mib_tokens} x 576 (1 MiB)"] = collective("all_reduce", (mib_tokens, 576))
        out[f"all_gather {num_tokens} x {vocab_per_rank} per rank (logits)"] = collective("all_gather", (num_tokens, vocab_per_rank))
        out["send+recv hidden+residual 1 x 576 (one way)"] = hop((1, 576))
        out[f"send+recv hidden+residual {num_tokens} x 576 (one way, decode step)"] = hop((num_tokens, 576))
        out[f"send+recv hidden+residual {mib_tokens} x 576 (one way, 2 x 1 MiB)"] = hop((mib_tokens, 576))
        shared = ray.put(step_inputs)
        ray.get(probes[0].echo.remote(shared))
        calls = []
        for _ in range(iters):
            t0 = time.perf_counter()
            ray.get(probes[0].echo.remote(ray.put(step_inputs)))
            calls.append(time.perf_counter() - t0)
        out["ray: put(step delta) + one actor call + get"] = calls
        two = remote.options(num_cpus=2).remote(0, 1)
        threads = (ray.get(probes[0].num_threads.remote()), ray.get(two.num_threads.remote()))
        ray.kill(two, no_restart=True)
        ray.get([p.shutdown.remote() for p in probes], timeout=30)
        return out, threads
    finally:
        for p in probes:
            ray.kill(p, no_restart=True)


# -- the run -----------------------------------------------------------------------------


def main() -> None:
    print(f"threads: driver {torch.get_num_threads()} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
          f"cores visible: {len(os.sched_getaffinity(0))}, load average at start: {os.getloadavg()[0]:.2f}")
    model_dir = resolve_model(MODEL)
    args = LlamaArgs.from_hf_config(read_hf_config(model_dir))
    backend = default_attention_backend(torch.device("cpu"), torch.float32)
    num_blocks = ARGS.num_seqs * -(-(ARGS.prompt_len + ARGS.warmup + ARGS.steps + 1) // BLOCK_SIZE) + 1
    n = ARGS.num_seqs
    print(f"torch {torch.__version__}, ray {ray.__version__}, model {MODEL} fp32 ({args.num_layers} layers, "
          f"hidden {args.hidden_size}, {args.num_heads} heads / {args.num_kv_heads} kv heads), attention backend {backend}")
    print(f"workload: {n} sequences x {ARGS.prompt_len}-token prompts, one prefill step, {ARGS.warmup} warm-up "
          f"decodes, then median of {ARGS.steps} decode steps ({n} tokens each)")

    steps, reference, runner = make_steps(model_dir, backend, num_blocks)
    timed = slice(1 + ARGS.warmup, None)
    local_first = statistics.median(replay(runner.forward, steps, reference)[0][timed])
    bounds = stage_layers(args, 2)
    chain = StageChain(model_dir, backend, num_blocks, bounds)
    local = {"TP": {"in-process": runner.forward}, "PP": {"in-process": runner.forward, "in-process stages": chain.forward}}

    head = {"num_cpus": CPUS_PER_NODE, "node_ip_address": LOOPBACK, "include_dashboard": False}
    # NOTE: without OMP_NUM_THREADS in its environment, Ray gives each actor floor(num_cpus) threads.
    with env_without("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        with env_without("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            cluster.add_node(num_cpus=CPUS_PER_NODE, node_ip_address=LOOPBACK)
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        node_ids = sorted(nd["NodeID"] for nd in ray.nodes() if nd["Alive"])
        comm, ((threads1, policy), (threads2, _)) = comm_times(node_ids, n, args.vocab_size // 3, steps[-1].delta)
        groups = {
            name: run_group(model_dir, shapes, backend, num_blocks, steps, reference, local[name])
            for name, shapes in GROUPS.items()
        }
        pipelined = engine_runs(model_dir, backend)
    finally:
        ray.shutdown()
        cluster.shutdown()

    print(f"shard threads: Ray sets OMP_NUM_THREADS = the shard's CPUs (probe actors: 1 CPU -> {threads1} "
          f"thread, 2 CPUs -> {threads2} threads; OMP_WAIT_POLICY={policy}); cluster: 2 Ray nodes x "
          f"{CPUS_PER_NODE} CPUs, all on the same {len(os.sched_getaffinity(0))} cores")

    med = {g: {label: statistics.median(r.times[timed]) for label, r in runs.items()} for g, runs in groups.items()}
    print(f"\n(1) decode step time, {n} sequences, median of {ARGS.steps} steps. Each group's replicas run side by "
          f"side, taking turns step by step, so load drift hits them alike; compare within a group.")
    print(f"  in-process ShardRunner alone, before the cluster started: {ms(local_first)} ({n / local_first:.1f} tok/s)")
    for g, runs in groups.items():
        print(f"  group {g}:")
        for label, r in runs.items():
            where = f"in-process, {NUM_THREADS} threads" if label.startswith("in-process") else "RayExecutor"
            extra = f"startup {r.startup_s:.1f} s; " if r.startup_s else ""
            print(f"    {label:32s} {where:22s} {ms(med[g][label]):>10s}  ({n / med[g][label]:5.1f} tok/s; "
                  f"{extra}max |logits - in-process| {r.max_diff:.1e})")

    tp3, tp1, tp1_1 = (med["TP"][label] for label in GROUPS["TP"])
    pp1, pp2 = med["PP"]["TP=1 PP=1, 1 shard x 2 threads"], med["PP"]["TP=1 PP=2, 2 stages x 2 threads"]
    stages = [statistics.median(t[timed]) for t in chain.times]  # NOTE: only the PP group ran the chain
    num_ar = 2 * args.num_layers + 1
    print(f"\n(2) communication (gloo, loopback; {ARGS.comm_iters} calls each; 3-rank group for collectives)")
    print(f"  {'':58s} {'median':>10s} {'p10':>10s} {'p90':>10s}")
    for what, times in comm.items():
        deciles = statistics.quantiles(times, n=10)
        print(f"  {what:58s} {ms(statistics.median(times)):>10s} {ms(deciles[0]):>10s} {ms(deciles[-1]):>10s}")
    comm = {what: statistics.median(times) for what, times in comm.items()}
    ar = comm[f"all_reduce {n} x 576 (decode step)"]
    ag = comm[f"all_gather {n} x {args.vocab_size // 3} per rank (logits)"]
    hop = comm[f"send+recv hidden+residual {n} x 576 (one way, decode step)"]
    call = comm["ray: put(step delta) + one actor call + get"]
    tp_comm = num_ar * ar + ag
    print(f"  measured, TP=3 per step: {num_ar} all_reduce (2 per layer x {args.num_layers} + 1 in the embedding) "
          f"x {ms(ar)} + 1 all_gather {ms(ag)} = {ms(tp_comm)} ({tp_comm / tp3:.0%} of the TP=3 step)")
    print(f"  measured, PP=2 per step: 1 stage boundary x (hidden + residual) = {ms(hop)} ({hop / pp2:.1%} of the PP=2 step)")
    print(f"  upper bound, TP=3: step(TP=3) - step(TP=1) / 3 = {ms(tp3)} - {ms(tp1 / 3)} = {ms(tp3 - tp1 / 3)}: everything")
    print("    that is not a perfect 3-way split (collectives, waiting for the slowest rank, 3 actor calls, 3 shards")
    print(f"    time-sharing 2 cores). Tighter: 3 one-thread shards on 2 cores at best take step(TP=1, 1 thread) / 2 = "
          f"{ms(tp1_1 / 2)}, leaving {ms(tp3 - tp1_1 / 2)}")

    print("\n(3) pipeline without micro-batching (stages run one after the other), group PP")
    print(f"  layer split (stage_layers): {bounds} (the last stage also holds the LM head)")
    print(f"  decode throughput: PP=1 {n / pp1:.1f} tok/s, PP=2 {n / pp2:.1f} tok/s -> PP=2 / PP=1 = {pp1 / pp2:.2f}x")
    for k, ((s, e), t) in enumerate(zip(bounds, stages, strict=True)):
        print(f"  stage {k} (layers {s}-{e - 1}): forward {ms(t)} (in-process, {NUM_THREADS} threads, same group); "
              f"busy {t / pp2:.0%} of the PP=2 step")
    print(f"  stage sum {ms(sum(stages))}; the rest of the PP=2 step, {ms(pp2 - sum(stages))}, is Ray calls "
          f"(~{ms(call)} each, 2 shards), the hop and wake-ups. Overlapped micro-batches could approach the slower "
          f"stage, {ms(max(stages))}")
    print(f"\n(4) pipeline with micro-batching, through the engine: {ARGS.engine_seqs} requests x "
          f"{ARGS.prompt_len}-token prompts x {ARGS.engine_tokens} greedy tokens, the engine steps until all finish;"
          f" decode tok/s from the step where every request has its first token; {ARGS.engine_rounds} rounds in "
          f"turns, medians")
    base = statistics.median(pipelined[ENGINE_RUNS[0][0]][0])
    for label, _, _ in ENGINE_RUNS:
        rates, busy = pipelined[label]
        rate = statistics.median(rates)
        stages_busy = ", ".join(f"stage {k} {b:.0%}" for k, b in enumerate(busy))
        print(f"  {label:44s} {rate:6.1f} tok/s  ({rate / base:.2f}x PP=1)   busy: {stages_busy}")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f} (on {len(os.sched_getaffinity(0))} cores; other processes skew timings)")

    print("\nsummary:")
    verdict = "slower" if tp3 > tp1 else "faster"
    print(f"  TP=3 is {verdict} than TP=1 on these 2 cores ({tp3 / tp1:.2f}x the step time): its {num_ar + 1} gloo "
          f"collectives per step cost ~{ms(tp_comm)} measured alone, and 3 shards share 2 cores.")
    print(f"  PP=2 gives {pp1 / pp2:.2f}x the PP=1 throughput: with no micro-batching one stage idles while the other "
          f"works (busy {', '.join(f'{t / pp2:.0%}' for t in stages)}), so PP adds memory, not speed; a stage hop "
          f"costs ~{ms(hop)}, one Ray actor call ~{ms(call)}.")

if __name__ == "__main__":
    main()
