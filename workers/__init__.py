"""kvtide.workers: one model replica's engine and model code (no Ray, no servers).

The public surface is the names below; everything else may move. cluster/ imports workers only
through it (a layout test checks). Names load on first use, so ``from kvtide.workers import
plan_kv_cache`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # the engine and its messages
    "AsyncEngine": "async_engine",
    "Engine": "engine",
    "EngineStats": "engine",
    "LLM": "llm",
    "StepFailedError": "llm",
    "EngineRequest": "engine_request",
    "RequestLimits": "engine_request",
    "check_request": "engine_request",
    "SamplingParams": "sampling_params",
    "SampledToken": "sampler",
    "Completion": "outputs",
    "CompletionDelta": "outputs",
    "RequestOutput": "outputs",
    "KvSnapshot": "block_pool",
    # text
    "Tokenizer": "tokenizer",
    "IncrementalDetokenizer": "detokenizer",
    # configuration and models
    "CacheConfig": "config",
    "EngineConfig": "config",
    "ModelConfig": "config",
    "ResolvedConfig": "config",
    "SchedulerConfig": "config",
    "resolve": "config",
    "resolve_engine": "config",
    "resolve_model": "model_files",
    "read_hf_config": "model_loader",
    "load_model": "model_loader",
    "LlamaArgs": "models.llama",
    # one shard of a replica
    "ShardRunner": "shard",
    "ShardMemory": "shard",
    "kv_plan": "config",
    "PipelineLinks": "shard",
    "stage_layers": "shard",
    "TensorParallel": "parallel",
    "BatchState": "step_inputs",
    "StepDelta": "step_inputs",
    "StepOutput": "step_inputs",
    # sizing and cost
    "CpuBudget": "sizing",
    "GpuMemory": "sizing",
    "KV_CACHE_DTYPES": "sizing",
    "KvPlan": "sizing",
    "ModelShape": "sizing",
    "ParallelLayout": "sizing",
    "plan_kv_cache": "sizing",
    "KNOWN_CONFIGS": "model_shapes",
    "get_gpu": "gpu_catalog",
    "EngineProfileMeasurement": "roofline",
    "BANDWIDTH_EFFICIENCY": "roofline",
    "COMPUTE_EFFICIENCY": "roofline",
    "cost_per_million_output_tokens": "roofline",
    "measured": "roofline",
    "peak_flops": "roofline",
    "roofline_speed": "roofline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtide.workers' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kvtide.workers.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

