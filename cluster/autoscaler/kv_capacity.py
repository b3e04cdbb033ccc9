"""A profile's KV cache, through the one sizing function (``kvtide.workers.sizing.plan_kv_cache``).

The autoscaler never does KV arithmetic of its own: a profile's KV capacity in tokens is what
``plan_kv_cache`` gives for the model's shape, the profile's layout, dtypes and memory, the
same numbers ``kvtide size`` prints and the engine allocates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kvtide.cluster.autoscaler.profile import EngineProfile
from kvtide.workers import (
    KV_CACHE_DTYPES,
    CpuBudget,
    GpuMemory,
    KvPlan,
    ModelShape,
    ParallelLayout,
    plan_kv_cache,
)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def kv_plan(model_config: Mapping[str, Any], profile: EngineProfile, *, check_fits: bool = True) -> KvPlan:
    """The KV cache of one replica of ``profile`` serving the model of ``model_config`` (an HF
    config dict). With ``check_fits``, a ``max_model_len`` that does not fit raises ``ValueError``."""
    if profile.gpu_memory_gib is None:
        memory: GpuMemory | CpuBudget = CpuBudget(int(profile.kv_cache_gib * 2**30))
    else:
        memory = GpuMemory(int(profile.gpu_memory_gib * 2**30), profile.gpu_memory_utilization)
    return plan_kv_cache(
        ModelShape.from_hf_config(dict(model_config)),
        dtype=_DTYPES[profile.dtype],
        block_size=profile.block_size,
        memory=memory,
        layout=ParallelLayout(profile.tp, profile.pp),
        quantization=profile.quantization,
        kv_cache_dtype=KV_CACHE_DTYPES.get(profile.kv_cache_dtype),
        max_model_len=profile.max_model_len if check_fits else None,
        max_num_batched_tokens=profile.max_num_batched_tokens,
        max_num_seqs=profile.max_num_seqs,
    )


def kv_tokens_capacity(model_config: Mapping[str, Any], profile: EngineProfile) -> int:
    """Tokens of KV cache one replica of ``profile`` holds (whole blocks)."""
    return kv_plan(model_config, profile, check_fits=False).num_tokens


def model_max_len(model_config: Mapping[str, Any]) -> int:
    """The model's own context length."""
    return int(model_config.get("max_position_embeddings", 2048))
