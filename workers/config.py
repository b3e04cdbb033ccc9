"""Engine configuration: one frozen dataclass per concern, composed into ``EngineConfig``.

``EngineConfig.resolve(model_config)`` settles every "auto" value (KV block count, context
length, dtype) once; nothing is mutated afterwards.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtide.kernels.capability import check_device_support
from kvtide.kernels.kv_quant import KV_CACHE_DTYPES, is_quantized
from kvtide.workers.attention import default_attention_backend, get_attention_backend
from kvtide.workers.quantization import QUANTIZATIONS
from kvtide.workers.shard import ShardMemory
from kvtide.workers.sizing import (
    CpuBudget,
    GpuMemory,
    KvPlan,
    ModelShape,
    ParallelLayout,
    kv_bytes_per_token,
    plan_kv_cache,
)
from kvtide.workers.tokenizer import eos_token_ids

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    model: str = "smollm2-135m"
    """A known model name, a Hugging Face-format directory, or a .gguf file."""
    dtype: str = "auto"
    """float32 | float16 | bfloat16 | auto (float32 on CPU, bfloat16 on CUDA)."""
    max_model_len: int | None = None
    """Context length (prompt + output); None takes the model's own."""
    device: str = "auto"
    """cpu | cuda | auto."""
    attention_backend: str = "auto"
    """torch | cpu | auto (the compiled CPU kernel for fp32 on CPU when it builds, else torch)."""
    quantization: str = "none"
    """Weights of the decoder layers' linear layers: none | fp8 (e4m3) | int8 (weight-only),
    one scale per output channel; embedding and LM head stay in ``dtype``
    (workers/quantization.py)."""


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """KV blocks to allocate; None sizes the cache from ``kv_cache_memory_gib``."""
    kv_cache_memory_gib: float = 1.0
    """On a CPU: the KV cache budget of each shard, when ``num_blocks`` is None."""
    gpu_memory_utilization: float = 0.9
    """On a GPU: the fraction of each GPU's memory the engine may use; the KV cache gets what
    the weights and the measured peak of a full step leave of it (vLLM's setting)."""
    enable_prefix_caching: bool = True
    hash_seed: str = ""
    """Salts every block hash; routers must use the same seed."""
    kv_cache_dtype: str = "auto"
    """auto (the model's dtype) | fp8 (e4m3) | int8: quantized caches keep one fp32 scale per
    token and KV head (kernels/kv_quant.py) and hold about twice the blocks of fp16."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most sequences in one step's batch."""
    max_num_batched_tokens: int = 1024
    """Token budget of one step (decode tokens + prefill chunks)."""
    max_prefill_chunk: int | None = None
    """Cap on one request's prefill chunk per step; None lets one prefill take the budget."""
    queue_order_s_per_token: float = 0.001
    """The waiting queue's order: arrival time plus this many seconds for each prompt token a
    request must still compute (prefix-cache hits deducted). Among requests that arrive close
    together the shorter prefills go first, which brings their first tokens forward; a request
    is passed only by ones that arrive within its own slack, so no wait grows without bound.
    0 is first come, first served."""


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Shards per pipeline stage, on one node."""
    pipeline_parallel_size: int = 1
    """Pipeline stages, spread over nodes."""


_PARTS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "parallel": ParallelConfig}


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 0
    """Seeds the RNG of requests that give no seed of their own."""

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from flat keyword arguments (``block_size=32, max_num_seqs=8``)."""
        parts: dict[str, dict[str, Any]] = {name: {} for name in _PARTS}
        top: dict[str, Any] = {}
        owners = {f.name: part for part, klass in _PARTS.items() for f in dataclasses.fields(klass)}
        for key, value in kwargs.items():
            if key in owners:
                parts[owners[key]][key] = value
            elif key == "seed":
                top[key] = value
            else:
                known = sorted([*owners, "seed"])
                raise ValueError(f"unknown engine option {key!r}; known options: {', '.join(known)}")
        return cls(
            model=ModelConfig(**parts["model"]),
            cache=CacheConfig(**parts["cache"]),
            scheduler=SchedulerConfig(**parts["scheduler"]),
            parallel=ParallelConfig(**parts["parallel"]),
            **top,
        )


@dataclass(frozen=True)
class ResolvedConfig:
    """Everything the engine needs, with no "auto" left."""

    engine: EngineConfig
    model_dir: str
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    num_blocks: int
    """0 on a GPU until the shards measured their memory (``kv_plan``)."""
    block_size: int
    bytes_per_block: int
    """Of the whole replica (every shard's part of a block)."""
    eos_token_ids: frozenset[int]
    """From config.json, tokenizer_config.json and generation_config.json."""
    vocab_size: int
    attention_backend: str
    kv_cache_dtype: torch.dtype
    """Storage dtype of the KV cache: the model's ``dtype``, or int8 / fp8 (quantized)."""
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False)
    """The model's config.json, read once where it was resolved: a process on another node
    (a replica actor, a shard before it has the files) needs the model's shape, not its path."""

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def check_device(self, device: torch.device | None = None) -> tuple[str, ...]:
        """Refuse, before any weight loads, what this process's ``device`` (default: the
        resolved one) cannot run: ``ValueError`` naming each option, the compute capability it
        needs and what to use instead. Returns notes on what runs slower than it could."""
        return check_device_support(
            device or self.device, kv_cache_dtype=self.kv_cache_dtype, quantization=self.engine.model.quantization,
            dtype=self.dtype, attention_backend=self.attention_backend,
        ).notes  # fmt: skip

    def describe_kv_cache(self) -> str:
        """One line for logs: dtype, blocks, tokens and bytes of the KV cache."""
        dtype = self.kv_cache_dtype
        kind = str(dtype).removeprefix("torch.")
        if is_quantized(dtype):
            kind += " + fp32 scale per token and KV head"
        return (
            f"KV cache ({kind}): {self.num_blocks} blocks x {self.block_size} tokens = "
            f"{self.num_blocks * self.block_size} tokens, {self.kv_cache_bytes / 2**20:.1f} MiB"
        )


def resolve_engine(config: EngineConfig) -> ResolvedConfig:
    """Locate ``config.model.model`` (converting a GGUF once, into the cache) and ``resolve``."""
    from kvtide.workers.model_files import resolve_model
    from kvtide.workers.model_loader import read_hf_config

    model_dir = resolve_model(config.model.model)
    return resolve(config, str(model_dir), read_hf_config(model_dir))


def resolve(config: EngineConfig, model_dir: str, hf_config: dict[str, Any]) -> ResolvedConfig:
    mc, cc, sc = config.model, config.cache, config.scheduler
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if mc.device == "auto" else mc.device
    )
    if mc.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif mc.dtype in _DTYPES:
        dtype = _DTYPES[mc.dtype]
    else:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {mc.dtype!r}")
    if mc.quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {mc.quantization!r}"
        )
    model_len = int(hf_config.get("max_position_embeddings", 2048))
    max_model_len = model_len if mc.max_model_len is None else mc.max_model_len
    if not 1 <= max_model_len <= model_len:
        raise ValueError(
            f"max_model_len must be in [1, {model_len}] (the model's context length), "
            f"got {max_model_len}"
        )
    if cc.block_size < 1 or cc.block_size & (cc.block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 1, got {cc.block_size}")
    if sc.max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {sc.max_num_seqs}")
    if sc.max_num_batched_tokens < 1:
        raise ValueError(f"max_num_batched_tokens must be >= 1, got {sc.max_num_batched_tokens}")
    if sc.max_prefill_chunk is not None and sc.max_prefill_chunk < 1:
        raise ValueError(f"max_prefill_chunk must be >= 1 or None, got {sc.max_prefill_chunk}")
    if not 0 <= sc.queue_order_s_per_token < math.inf:
        raise ValueError(f"queue_order_s_per_token must be finite and >= 0, got {sc.queue_order_s_per_token}")

    pc = config.parallel
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(pc, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(pc, name)}")
    shape = ModelShape.from_hf_config(hf_config)
    if cc.kv_cache_dtype not in ("auto", *KV_CACHE_DTYPES):
        raise ValueError(
            f"kv_cache_dtype must be one of auto, {', '.join(KV_CACHE_DTYPES)}; got {cc.kv_cache_dtype!r}"
        )
    kv_dtype = KV_CACHE_DTYPES.get(cc.kv_cache_dtype) or dtype
    if is_quantized(kv_dtype) and shape.head_dim % 4:
        raise ValueError(f"kv_cache_dtype {cc.kv_cache_dtype!r} needs head_dim divisible by 4, got {shape.head_dim}")
    if not (math.isfinite(cc.gpu_memory_utilization) and 0 < cc.gpu_memory_utilization <= 1):
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {cc.gpu_memory_utilization}")
    # K and V rows of every layer; a quantized row also stores its scale.
    bytes_per_block = cc.block_size * kv_bytes_per_token(shape, kv_dtype)
    if cc.num_blocks is not None:
        num_blocks = cc.num_blocks
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks} (one block needs {bytes_per_block} bytes)")
    elif device.type == "cpu":
        if not (math.isfinite(cc.kv_cache_memory_gib) and cc.kv_cache_memory_gib > 0):
            raise ValueError(f"kv_cache_memory_gib must be finite and > 0, got {cc.kv_cache_memory_gib}")
        plan = plan_kv_cache(
            shape, dtype=dtype, block_size=cc.block_size, memory=CpuBudget(int(cc.kv_cache_memory_gib * 2**30)),
            layout=ParallelLayout(pc.tensor_parallel_size, pc.pipeline_parallel_size),
            quantization=mc.quantization, kv_cache_dtype=kv_dtype, max_model_len=max_model_len,
        )  # fmt: skip
        num_blocks = plan.num_blocks
    else:
        num_blocks = 0  # measured when the shards are on their GPUs: ``kv_plan``
    return ResolvedConfig(
        engine=config,
        model_dir=model_dir,
        device=device,
        dtype=dtype,
        max_model_len=max_model_len,
        num_blocks=num_blocks,
        block_size=cc.block_size,
        bytes_per_block=bytes_per_block,
        eos_token_ids=_eos_ids(hf_config.get("eos_token_id")) | eos_token_ids(model_dir),
        vocab_size=hf_config["vocab_size"],
        attention_backend=(
            default_attention_backend(device, dtype)
            if mc.attention_backend == "auto"
            else get_attention_backend(mc.attention_backend).name
        ),
        kv_cache_dtype=kv_dtype,
        hf_config=dict(hf_config),
    )


def kv_plan(config: ResolvedConfig, measured: Sequence[ShardMemory]) -> KvPlan:
    """The KV cache of a replica on GPUs, by the one sizing function: ``gpu_memory_utilization``
    of its smallest GPU, less each stage's weights, less the largest reserve its shards measured
    (``ShardRunner.measure_memory``). Raises ``ValueError`` with the numbers when one
    ``max_model_len`` sequence cannot fit."""
    pc, cc = config.engine.parallel, config.engine.cache
    memory = GpuMemory(
        total_bytes=min(m.total_bytes for m in measured), utilization=cc.gpu_memory_utilization,
        reserve_bytes=max(m.reserve_bytes for m in measured),
    )  # fmt: skip
    return plan_kv_cache(
        ModelShape.from_hf_config(config.hf_config), dtype=config.dtype, block_size=config.block_size,
        memory=memory, layout=ParallelLayout(pc.tensor_parallel_size, pc.pipeline_parallel_size),
        quantization=config.engine.model.quantization, kv_cache_dtype=config.kv_cache_dtype,
        max_model_len=config.max_model_len,
    )  # fmt: skip


def _eos_ids(value: int | list[int] | None) -> frozenset[int]:
    if value is None:
        return frozenset()
    return frozenset([value] if isinstance(value, int) else value)
