"""KV cache sizing (workers/sizing.py): hand-computed block counts, weights against the model
the engine builds, today's CPU budget against ``resolve()``, and the refusal of a
``max_model_len`` that cannot fit."""

from __future__ import annotations

import pytest
import torch

from kvtide.workers.config import EngineConfig, resolve
from kvtide.workers.gpu_catalog import GPUS
from kvtide.workers.model_shapes import KNOWN_CONFIGS, NUM_PARAMS
from kvtide.workers.models.llama import LlamaForCausalLM
from kvtide.workers.parallel import TensorParallel
from kvtide.workers.quantization import get_linear_method, weight_bytes
from kvtide.workers.shard import stage_layers
from kvtide.workers.sizing import (
    CpuBudget,
    GpuMemory,
    ModelShape,
    ParallelLayout,
    estimate_reserve_bytes,
    gpu_shares,
    kv_bytes_per_token,
    plan_kv_cache,
)

from tests.tiny import tiny_llama_config

GiB = 2**30
LLAMA_70B = dict(KNOWN_CONFIGS["llama-3-70b"], max_position_embeddings=131072)  # Llama-3.1-70B's context


@pytest.mark.parametrize("name", sorted(KNOWN_CONFIGS))
def test_known_shapes_count_their_published_parameters(name):
    assert ModelShape.from_hf_config(KNOWN_CONFIGS[name]).num_params == NUM_PARAMS[name]


def test_seed_rule_of_thumb_8b_in_fp16_on_an_l4():
    """The seed talk's rule: an 8B model in fp16 needs about 16 GB (parameters x 2 bytes), and on
    a 24 GB L4 about 8 GB are left for the KV cache before reserves. (The talk says 4 GB, taking
    the L4 for a 20 GB card; the catalog has the data sheet's 24 GB, and ``kvtide size`` prints it.)"""
    shape = ModelShape.from_hf_config(KNOWN_CONFIGS["llama-3-8b"])
    (share,) = gpu_shares(shape, ParallelLayout(), torch.float16)
    assert share.weight_bytes == 8_030_261_248 * 2 == 16_060_522_496  # ~16 GB
    assert GPUS["l4"].memory_bytes == 24 * 10**9
    left = GPUS["l4"].memory_bytes - share.weight_bytes
    assert left == 7_939_477_504  # ~8 GB
    assert abs(left / 1e9 - 8) < 0.1


def test_llama_3_8b_kv_bytes_per_token():
    shape = ModelShape.from_hf_config(KNOWN_CONFIGS["llama-3-8b"])
    # 32 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes = 128 KiB
    assert kv_bytes_per_token(shape, torch.bfloat16) == 32 * 8 * 128 * 2 * 2 == 131072 == 128 * 1024
    # A quantized row carries its fp32 scale: 128 + 4 bytes.
    assert kv_bytes_per_token(shape, torch.int8) == 32 * 8 * (128 + 4) * 2 == 67584
    # Per GPU at TP=2: half the KV heads.
    (share,) = gpu_shares(shape, ParallelLayout(tp=2), torch.bfloat16)
    assert share.kv_bytes_per_token == 131072 // 2


def test_llama_3_70b_at_tp8_on_80_gb_blocks_by_hand():
    """80 layers, 8 KV heads, head_dim 128, hidden 8192, intermediate 28672, vocab 128256, 64
    heads; bf16; TP=8 on a declared 80 GB (80e9 bytes) per GPU, utilization 0.9, a measured
    activation reserve of 2 GiB, blocks of 16 tokens."""
    shape = ModelShape.from_hf_config(LLAMA_70B)
    memory = GpuMemory(total_bytes=80 * 10**9, utilization=0.9, reserve_bytes=2 * GiB)
    plan = plan_kv_cache(shape, dtype=torch.bfloat16, block_size=16, memory=memory,
                         layout=ParallelLayout(tp=8), max_model_len=131072)  # fmt: skip

    # Weights of one GPU, in parameters (bf16: 2 bytes each):
    embedding = 128256 // 8 * 8192  # vocab-parallel: 16032 rows x 8192 = 131,334,144
    lm_head = embedding  # untied, same split
    qkv = 8192 * (64 // 8 + 2 * (8 // 8)) * 128  # 8 q heads + 1 k + 1 v head: 10,485,760
    o_proj = (64 // 8) * 128 * 8192  # 8,388,608
    gate_up = 8192 * 2 * (28672 // 8)  # 58,720,256
    down = (28672 // 8) * 8192  # 29,360,128
    norms = 80 * 2 * 8192 + 8192  # replicated on every GPU: 1,318,912
    params = embedding + lm_head + 80 * (qkv + o_proj + gate_up + down) + norms
    assert params == 8_820_367_360
    weights = params * 2  # 17,640,734,720 bytes
    usable = 72_000_000_000  # floor(80e9 x 0.9)
    kv_bytes = usable - weights - 2 * GiB  # 52,211,781,632
    per_block = 2 * 80 * 16 * (8 // 8) * 128 * 2  # K and V, 80 layers, 16 tokens, 1 KV head: 655,360
    blocks = kv_bytes // per_block
    assert blocks == 79_668

    (stage,) = plan.stages
    assert stage.share.weight_bytes == weights
    assert stage.kv_bytes == kv_bytes
    assert stage.bytes_per_block == per_block
    assert plan.num_blocks == blocks
    assert plan.num_tokens == blocks * 16 == 1_274_688
    assert plan.bytes_per_block == 8 * per_block  # the replica's block across its 8 GPUs


def test_a_max_model_len_that_cannot_fit_is_refused_with_the_numbers():
    shape = ModelShape.from_hf_config(LLAMA_70B)
    memory = GpuMemory(total_bytes=80 * 10**9, utilization=0.25, reserve_bytes=2 * GiB)
    with pytest.raises(ValueError) as info:
        plan_kv_cache(shape, dtype=torch.bfloat16, block_size=16, memory=memory,
                      layout=ParallelLayout(tp=8), max_model_len=131072)  # fmt: skip
    message = str(info.value)
    needed = 131072 // 16 * 655_360  # 8192 blocks of 655,360 bytes per GPU = 5 GiB
    available = 20_000_000_000 - 17_640_734_720 - 2 * GiB  # floor(80e9 x 0.25) - weights - reserve
    assert "max_model_len 131072" in message
    assert f"({needed} bytes) of KV cache on each GPU" in message
    assert f"({available} bytes) available" in message
    assert f"the KV cache holds {available // 655_360 * 16} tokens" in message
    assert "gpu_memory_utilization 0.25" in message


def test_weights_that_do_not_fit_leave_no_blocks_and_are_refused():
    shape = ModelShape.from_hf_config(LLAMA_70B)
    plan = plan_kv_cache(shape, dtype=torch.bfloat16, block_size=16, memory=GpuMemory(80 * 10**9))
    assert plan.stages[0].kv_bytes < 0 and plan.num_blocks == 0
    excess = 141_107_412_992 + plan.stages[0].reserve_bytes - 72_000_000_000  # bf16 weights + reserve - usable
    with pytest.raises(ValueError, match=rf"has 0\.00 GiB \(0 bytes\) available .* by \d+\.\d+ GiB \({excess} bytes\)"):
        plan.check_fits(1)


@pytest.mark.parametrize(
    ("gib", "kv_cache_dtype", "block_size"), [(1.0, "auto", 16), (0.3, "auto", 16), (2.5, "int8", 32), (1.0, "fp8", 8)]
)
def test_cpu_budget_reproduces_resolve(gib, kv_cache_dtype, block_size):
    """Today's CPU sizing: ``kv_cache_memory_gib`` over the whole model's bytes per block."""
    config = KNOWN_CONFIGS["smollm2-135m"]
    engine = EngineConfig.from_kwargs(
        device="cpu", dtype="float32", attention_backend="torch", kv_cache_memory_gib=gib, max_model_len=2048,
        kv_cache_dtype=kv_cache_dtype, block_size=block_size,
    )  # fmt: skip
    resolved = resolve(engine, "unused", config)
    plan = plan_kv_cache(
        ModelShape.from_hf_config(config), dtype=torch.float32, block_size=block_size,
        memory=CpuBudget(int(gib * GiB)), kv_cache_dtype=resolved.kv_cache_dtype,
    )  # fmt: skip
    assert (plan.num_blocks, plan.bytes_per_block) == (resolved.num_blocks, resolved.bytes_per_block)
    if (gib, kv_cache_dtype, block_size) == (1.0, "auto", 16):
        # 30 layers x 3 KV heads x 64 dims x 2 (K, V) x 4 bytes x 16 tokens = 737,280 bytes a block
        assert plan.bytes_per_block == 737_280
        assert plan.num_blocks == 2**30 // 737_280 == 1456


def test_cpu_budget_is_per_device():
    shape = ModelShape.from_hf_config(KNOWN_CONFIGS["smollm2-135m"])
    plan = plan_kv_cache(shape, dtype=torch.float32, block_size=16, memory=CpuBudget(GiB), layout=ParallelLayout(tp=3))
    assert plan.stages[0].bytes_per_block == 737_280 // 3
    assert plan.num_blocks == GiB // (737_280 // 3)


@pytest.mark.parametrize("quantization", ["none", "fp8", "int8"])
@pytest.mark.parametrize(("tied", "bias"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (1, 3), (2, 2)])
def test_weights_match_the_model_the_engine_builds(quantization, tied, bias, tp, pp):
    """Every shard's parameters and weight bytes (``quantization.weight_bytes``), built on the
    meta device as each TP rank of each stage builds them. fp32, so norms count either way."""
    config = tiny_llama_config(num_layers=5, num_heads=4, num_kv_heads=2, vocab_size=97,
                               tie_word_embeddings=tied, attention_bias=bias)  # fmt: skip
    shape = ModelShape.from_hf_config(config)
    shares = gpu_shares(shape, ParallelLayout(tp, pp), torch.float32, quantization)
    assert [(s.layer_start, s.layer_end) for s in shares] == stage_layers(shape.args, pp)
    for share in shares:
        for rank in range(tp):
            with torch.device("meta"):
                model = LlamaForCausalLM(shape.args, TensorParallel(rank, tp, object() if tp > 1 else None),
                                         torch.float32, share.layer_start, share.layer_end)  # fmt: skip
                if quantization != "none":
                    for module in model.modules():
                        if hasattr(module, "set_method"):
                            module.set_method(get_linear_method(quantization, "cpu"))
            assert weight_bytes(model) == share.weight_bytes
            assert sum(p.numel() for p in model.parameters()) == share.num_params


def test_pipeline_stages_differ_and_the_replica_takes_the_fewest_blocks():
    shape = ModelShape.from_hf_config(LLAMA_70B)
    plan = plan_kv_cache(shape, dtype=torch.bfloat16, block_size=16, layout=ParallelLayout(tp=2, pp=4),
                         memory=GpuMemory(80 * 10**9, 0.9, reserve_bytes=GiB))  # fmt: skip
    bounds = [(s.share.layer_start, s.share.layer_end) for s in plan.stages]
    assert bounds == stage_layers(shape.args, 4)
    counts = [s.num_blocks for s in plan.stages]
    assert len(set(counts)) == 4  # stages hold different layers and weights
    assert plan.num_blocks == min(counts)
    for s in plan.stages:
        layers = s.share.layer_end - s.share.layer_start
        assert s.bytes_per_block == 2 * layers * 16 * (8 // 2) * 128 * 2
        assert s.kv_bytes == 72_000_000_000 - s.share.weight_bytes - GiB
    assert plan.bytes_per_block == 2 * 2 * 80 * 16 * 4 * 128 * 2  # every GPU's share: the whole model's


def test_tp_beyond_the_kv_heads_replicates_them_and_other_splits_are_refused():
    shape = ModelShape.from_hf_config(KNOWN_CONFIGS["llama-3-8b"])
    (share,) = gpu_shares(shape, ParallelLayout(tp=16), torch.bfloat16)
    assert share.kv_bytes_per_token == 32 * 1 * 128 * 2 * 2  # one (replicated) KV head per GPU
    with pytest.raises(ValueError, match=r"tp 3 does not split .*allowed tp: 1, 2, 4, 8, 16, 32$"):
        gpu_shares(shape, ParallelLayout(tp=3), torch.bfloat16)
    with pytest.raises(ValueError, match=r"pp must be in \[1, 32\]"):
        gpu_shares(shape, ParallelLayout(pp=33), torch.bfloat16)
    with pytest.raises(ValueError, match="tp must be >= 1, got 0"):
        ParallelLayout(tp=0)


def test_estimated_reserve_by_hand():
    """Llama-3-8B, bf16, TP=1, 1024 batched tokens, 64 sequences (workers/sizing.py's formula)."""
    shape = ModelShape.from_hf_config(KNOWN_CONFIGS["llama-3-8b"])
    (share,) = gpu_shares(shape, ParallelLayout(), torch.bfloat16)
    per_token = 2 * (4 * 4096 + 4 * 14336 + 2 * 32 * 128 + 2 * 8 * 128)  # 167,936 bytes
    rope = 2 * 8192 * 128 * 2  # cos and sin tables, in the model dtype (as the loader keeps them)
    logits = 64 * (128256 * 2 + 128256 * 20)
    expected = 1024 * per_token + rope + logits
    assert expected == 356_745_216
    assert estimate_reserve_bytes(shape, ParallelLayout(), share, torch.bfloat16, 1024, 64) == expected
    plan = plan_kv_cache(shape, dtype=torch.bfloat16, block_size=16, memory=GpuMemory(24 * 10**9))
    assert not plan.stages[0].reserve_measured
    assert plan.stages[0].reserve_bytes == expected


def test_shape_by_hand_spreads_its_weights_evenly():
    shape = ModelShape.by_hand(num_params=8 * 10**9, num_layers=32, num_kv_heads=8, head_dim=128, max_position=4096)
    shares = gpu_shares(shape, ParallelLayout(tp=2, pp=2), torch.float16)
    assert [(s.layer_start, s.layer_end) for s in shares] == [(0, 16), (16, 32)]
    assert [s.weight_bytes for s in shares] == [8 * 10**9 * 16 // (32 * 2) * 2] * 2
    assert [s.kv_bytes_per_token for s in shares] == [2 * 16 * 4 * 128 * 2] * 2
    (one,) = gpu_shares(shape, ParallelLayout(), torch.float16, quantization="fp8")
    assert one.weight_bytes == 8 * 10**9  # all parameters in one byte
    with pytest.raises(ValueError, match="num_kv_heads must be >= 1, got 0"):
        ModelShape.by_hand(8 * 10**9, 32, 0, 128, 4096)


def test_bad_memory_values_are_named():
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\], got 1.5"):
        GpuMemory(80 * 10**9, 1.5)
    with pytest.raises(ValueError, match="the KV cache budget must be >= 1 byte, got 0"):
        CpuBudget(0)
    shape = ModelShape.from_hf_config(KNOWN_CONFIGS["smollm2-135m"])
    with pytest.raises(ValueError, match="quantization must be one of none, fp8, int8; got 'int4'"):
        gpu_shares(shape, ParallelLayout(), torch.float32, "int4")
