"""kvtide.workers: one model replica's engine and model code (no Ray, no servers).

The public surface is the names below; everything else may move.
"""

from kvtide.workers.async_engine import AsyncEngine
from kvtide.workers.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from kvtide.workers.engine import Engine, EngineStats
from kvtide.workers.llm import LLM
from kvtide.workers.outputs import Completion, CompletionDelta, RequestOutput
from kvtide.workers.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncEngine",
    "CacheConfig",
    "Completion",
    "CompletionDelta",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
]
