"""How big each section of the GPU check is in each mode, and how long it should take.

Sizing (one H200, a fresh machine, so Triton's kernel cache starts cold). The estimates
are upper bounds from these assumptions, not measurements; ``run.py`` prints each section's
estimate beside its measured time, so the first GPU run calibrates them:
- ``STARTUP_S``: Python, torch, triton and transformers imports, and CUDA context creation.
- ``WRITE_MODEL_S``: 135M random fp32 parameters drawn on the CPU and written (540 MB).
- ``LOAD_S``: one engine load from the page cache (540 MB read, cast, moved).
- ``COMPILE_S``: Triton JIT of one model configuration (KV write, decode and prefill
  attention, RMSNorm, rotary: ~5 kernels at 2-4 s each, cold cache).
- ``STEP_S``: one engine step of the 30-layer model, launch-bound: 30 layers x ~25 kernels
  x ~10 us + scheduler and sampler in Python; ``HF_STEP_S`` likewise for transformers.
Each section also gets a cap (``cap_s`` = 1.5 x its estimate) that its loops check, and the
whole run a budget (quick 290 s, full 470 s) after which the remaining sections are skipped;
the gpu tests run last in a subprocess with what the budget leaves, at most ``gpu_tests_s``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

STARTUP_S = 15.0
WRITE_MODEL_S = 10.0
LOAD_S = 3.0
COMPILE_S = 15.0
STEP_S = 0.03
HF_LOAD_S = 5.0
HF_STEP_S = 0.03

DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("torch", "triton")
KV_DTYPES = ("fp8", "int8")


@dataclass(frozen=True)
class Plan:
    mode: str
    num_prompts: int
    """Greedy comparisons: prompts per run."""
    prompt_len: int
    num_new_tokens: int
    """Tokens generated per prompt in the comparisons."""
    teacher_seqs: int
    """Teacher-forced comparison with transformers: sequences x positions next-token checks."""
    teacher_positions: int
    decode_steps: int
    """Timed decode steps per stream count (after ``warmup_steps``)."""
    warmup_steps: int = 4
    streams: tuple[int, ...] = (1, 64)
    budget_s: float = 290.0
    gpu_tests_s: float = 90.0
    num_blocks: int = 2048
    """KV blocks of the engines the comparisons build (the memory section sizes its own)."""
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    estimates: dict[str, float] = field(default_factory=dict)

    def estimate(self, section: str) -> float:
        return self.estimates.get(section, 0.0)

    def cap(self, section: str) -> float:
        return 1.5 * self.estimate(section) + 5.0

    @property
    def total_estimate_s(self) -> float:
        return STARTUP_S + sum(self.estimates.values())


def _estimates(p: Plan) -> dict[str, float]:
    # greedy: prefill + decodes + the step that finishes; teacher-forced: one 1-token request
    # per prefix, max_num_seqs of them a step
    gen_steps = p.num_new_tokens + 2 + -(-p.teacher_seqs * p.teacher_positions // p.max_num_seqs) + 1
    runs = len(DTYPES) * len(BACKENDS)
    return {
        "environment": 1.0,
        "imports": 5.0,
        "model": WRITE_MODEL_S,
        "engine_dtypes": runs * (LOAD_S + gen_steps * STEP_S) + len(DTYPES) * COMPILE_S,
        "kv_cache_dtypes": len(KV_DTYPES) * len(BACKENDS) * (LOAD_S + gen_steps * STEP_S) + len(KV_DTYPES) * COMPILE_S,
        "sampling": LOAD_S + 3 * gen_steps * STEP_S,
        "vs_transformers": 2 * (HF_LOAD_S + LOAD_S + gen_steps * STEP_S),
        "nccl": 8.0 + LOAD_S + gen_steps * STEP_S,
        "memory": 2 * LOAD_S + 10 * STEP_S + 5.0,
        "host_syncs": len(BACKENDS) * (LOAD_S + 4 * STEP_S),
        "decode_speed": 3.0 + LOAD_S + HF_LOAD_S
        + len(p.streams) * (p.decode_steps + p.warmup_steps + 2) * (STEP_S + 3 * HF_STEP_S),
        "gpu_tests": p.gpu_tests_s,
    }  # fmt: skip


def make_plan(mode: str) -> Plan:
    """``quick`` (under 5 minutes) or ``full`` (under 8)."""
    if mode == "quick":
        plan = Plan("quick", num_prompts=4, prompt_len=24, num_new_tokens=16, teacher_seqs=4,
                    teacher_positions=32, decode_steps=32, budget_s=290.0, gpu_tests_s=60.0)  # fmt: skip
    elif mode == "full":
        plan = Plan("full", num_prompts=8, prompt_len=48, num_new_tokens=32, teacher_seqs=8,
                    teacher_positions=64, decode_steps=128, budget_s=470.0, gpu_tests_s=150.0)  # fmt: skip
    else:
        raise ValueError(f"mode must be quick or full, got {mode!r}")
    return dataclasses.replace(plan, estimates=_estimates(plan))
