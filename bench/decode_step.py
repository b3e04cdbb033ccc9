"""One decode step of SmolLM2 (fp32) at a fixed batch, timed and split by phase.

Run:  .venv/bin/python bench/decode_step.py [--batch 1,8,16] [--steps 60] [--threads 2]

Per batch size B: B requests with 100-token random prompts are prefilled, then the engine
steps until each has generated ``--steps`` tokens; the median step time is printed with the
time per step in each phase, from wrappers put around the layers' methods at run time (each
phase's own time, without the wrapped calls inside it): linear (the 120 decoder matmuls), LM
head, attention (KV write + decode), norm, rope, the rest of the MLP (SiLU*mul), of attention,
of the model and of the engine step. The thread settings are kvtide's (``configure_threads``)
unless set in the environment, so ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` given on the
command line are what is measured, e.g.  GOMP_SPINCOUNT=0 .venv/bin/python bench/decode_step.py
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import sys
import time

from kvtide.cluster.threads import configure_threads


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,8,16", help="batch sizes (decoding sequences)")
    p.add_argument("--steps", type=int, default=60, help="decode steps per batch size")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--compare-modules", action="store_true",
                   help="alternate steps between the lean CPU loop (workers/models/llama_cpu.py) and the "
                        "layer modules, and print each one's median step and their ratio (no phase split)")
    return p.parse_args()


class Phases:
    """Own wall time per phase: each wrapper adds its call's time minus its wrapped children's."""

    def __init__(self) -> None:
        self.total: collections.Counter[str] = collections.Counter()
        self._stack: list[float] = []

    def wrap(self, cls: type, attr: str, phase: str) -> None:
        inner = getattr(cls, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            self._stack.append(0.0)
            try:
                return inner(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.total[phase] += dt - self._stack.pop()
                if self._stack:
                    self._stack[-1] += dt

        setattr(cls, attr, timed)


def main(args: argparse.Namespace) -> None:
    threads = configure_threads(args.threads)  # before torch
    import torch

    from kvtide.workers import attention, quantization
    from kvtide.workers.engine import Engine
    from kvtide.workers.layers import embedding, norm, rotary
    from kvtide.workers.models import llama
    from kvtide.workers.sampling_params import SamplingParams

    print(f"torch {torch.__version__}, {threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}, load average {os.getloadavg()[0]:.2f}")
    engine = Engine.load(args.model, num_blocks=2048, max_num_seqs=64, max_num_batched_tokens=1024)
    phases = Phases()
    model = engine.runner.executor.model
    for cls, attr, phase in (
        (quantization.Unquantized, "apply", "linear"), (embedding.ParallelLMHead, "compute_logits", "lm head"),
        (attention.TorchAttentionBackend, "forward", "attention"), (norm.RMSNorm, "forward", "norm"),
        (rotary.RopeStep, "apply", "rope"), (llama.LlamaMLP, "forward", "mlp other"),
        (llama.LlamaAttention, "forward", "attention other"), (llama.LlamaForCausalLM, "forward", "model other"),
        (Engine, "step", "step other"),
    ):  # fmt: skip
        if not args.compare_modules:
            phases.wrap(cls, attr, phase)
    rng = random.Random(0)
    for batch in (int(b) for b in args.batch.split(",")):
        params = SamplingParams(temperature=0.0, max_tokens=args.steps + 1, min_tokens=args.steps + 1, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"b{batch}-{i}", [rng.randrange(engine.vocab_size) for _ in range(100)], params)
        engine.step()  # the prefill (100 * batch tokens fit one step up to batch 10)
        while engine.scheduler.waiting or any(
            r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.running
        ):
            engine.step()
        phases.total.clear()
        times = []
        by_path: dict[bool, list[float]] = {True: [], False: []}
        while engine.has_unfinished_requests():
            if args.compare_modules:  # both paths give the same tokens, so steps can alternate
                model.use_cpu_stack = len(times) % 2 == 0
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
            by_path[model.use_cpu_stack].append(times[-1])
        model.use_cpu_stack = True
        n = len(times)
        if args.compare_modules:
            lean, modules = (1e3 * statistics.median(by_path[k]) for k in (True, False))
            print(f"batch {batch:3d}: median step {lean:6.1f} ms lean loop, {modules:6.1f} ms layer modules "
                  f"(alternating, {n} steps): modules/lean {modules / lean:.2f}x")
            continue
        print(f"batch {batch:3d}: median step {1e3 * statistics.median(times):6.1f} ms over {n} steps; per step: "
              + ", ".join(f"{k} {1e3 * v / n:.2f}" for k, v in phases.total.most_common()))
        sys.stdout.flush()


if __name__ == "__main__":
    main(parse_args())
