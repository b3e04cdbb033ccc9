"""The sections of the GPU check, in the order they run: each a name, what it runs, its
function on the GPU and its function in ``--dry-run`` (the same one where it needs no CUDA).

The gpu-marked tests run last, in a subprocess, with whatever the run's time budget leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import device_checks
import dry_checks
import engine_checks
import env_checks
from common import Context
from report import Row


@dataclass(frozen=True)
class Section:
    name: str
    what: str
    run: Callable[[Context], list[Row]]
    dry: Callable[[Context], list[Row]]


def _gpu_tests(ctx: Context) -> list[Row]:
    return env_checks.gpu_tests(ctx, timeout_s=max(10.0, ctx.time_left()))


SECTIONS: tuple[Section, ...] = (
    Section("environment", "versions, the GPU, the carried wheels", env_checks.environment, env_checks.environment),
    Section("imports", "every kvtide.workers / kvtide.kernels module, and the API the check uses",
            env_checks.imports, env_checks.imports),
    Section("model", "SmolLM2-shaped model on meta vs sizing; random fp32 checkpoint written once",
            env_checks.model, env_checks.model),
    Section("engine_dtypes", "Engine.load on CUDA in fp32, bf16, fp16 x torch, triton: greedy + teacher-forced",
            engine_checks.engine_dtypes, dry_checks.engine_dtypes),
    Section("vs_transformers", "bf16 and fp32 teacher-forced top-1 against transformers, same weights",
            engine_checks.vs_transformers, dry_checks.vs_transformers),
    Section("sampling", "seeded n=2 top-k/top-p/min-p/penalties with logprobs, twice; unseeded",
            engine_checks.sampling, dry_checks.sampling),
    Section("kv_cache_dtypes", "bf16 with fp8 and int8 KV caches on both backends vs the bf16 cache",
            engine_checks.kv_cache_dtypes, dry_checks.kv_cache_dtypes),
    Section("memory", "weights and the peak of a full step against plan_kv_cache / estimate_reserve_bytes",
            device_checks.memory, dry_checks.memory),
    Section("host_syncs", "syncs in one decode step, torch.cuda.set_sync_debug_mode('warn')",
            device_checks.host_syncs, dry_checks.host_syncs),
    Section("decode_speed", "decode tok/s at 1 and 64 streams vs weight-read floor and transformers bf16",
            device_checks.decode_speed, dry_checks.decode_speed),
    Section("nccl", "one shard in a 1-rank NCCL group, a direct all_reduce", device_checks.nccl, dry_checks.nccl),
    Section("gpu_tests", "pytest -m gpu on the tests/unit files that hold gpu tests", _gpu_tests, _gpu_tests),
)  # fmt: skip

NAMES = tuple(s.name for s in SECTIONS)


def select(only: str | None) -> tuple[Section, ...]:
    """The sections named in a comma list (all when None); raises ``ValueError`` naming the
    unknown ones and the known."""
    if not only:
        return SECTIONS
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in NAMES]
    if unknown:
        raise ValueError(f"--only names unknown sections {unknown}; known: {', '.join(NAMES)}")
    return tuple(s for s in SECTIONS if s.name in wanted)
