"""What each CUDA section does in ``--dry-run``: everything it can without CUDA (configs
resolved for a cuda device, capability checks for the H200, sizing predictions, the
transformers twin on the meta device), and one line saying what it would run."""

from __future__ import annotations

import json

import torch
from common import Context, need
from plan import BACKENDS, DTYPES, KV_DTYPES
from report import Row, row_for

H200_TOTAL_BYTES = 139 * 2**30
"""The lent H200 as the device tool describes it ("about 139 GiB"); the run reads the real total."""
H200_CAPABILITY = (9, 0)
A100_CAPABILITY = (8, 0)


def _meta_model_dir(ctx: Context) -> str:
    """A folder with only config.json: enough for ``resolve`` (no weights are read)."""
    path = ctx.work / "meta-model"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(ctx.shared["hf_config"]))
    return str(path)


def _resolve(ctx: Context, **options):
    EngineConfig, resolve = need("kvtide.workers.config.EngineConfig"), need("kvtide.workers.config.resolve")
    p = ctx.plan
    config = EngineConfig.from_kwargs(
        model="smollm2-random", device="cuda", block_size=p.block_size, num_blocks=p.num_blocks,
        max_num_seqs=p.max_num_seqs, max_num_batched_tokens=p.max_num_batched_tokens, **options,
    )  # fmt: skip
    return resolve(config, _meta_model_dir(ctx), ctx.shared["hf_config"])


def _check(capability, **options) -> str:
    check = need("kvtide.kernels.capability.check_dtype_support")
    try:
        check("cuda", capability, quantization="none", **options)
    except ValueError as exc:
        return f"refused: {exc}"
    return "accepted"


def engine_dtypes(ctx: Context) -> list[Row]:
    p, rows = ctx.plan, []
    auto = _resolve(ctx)
    rows.append(Row("auto on cuda resolves to", f"{str(auto.dtype).removeprefix('torch.')}, {auto.attention_backend}",
                    "ok" if auto.dtype == torch.bfloat16 else "FAIL", "dtype and attention backend a GPU user gets"))
    for dtype in DTYPES:
        for backend in BACKENDS:
            r = _resolve(ctx, dtype=dtype, attention_backend=backend)
            verdict = _check(H200_CAPABILITY, kv_cache_dtype="auto", dtype=dtype, attention_backend=backend)
            rows.append(Row(f"{dtype} {backend}", f"{r.bytes_per_block // 1024} KiB/block", "dry-run",
                            f"H200 {verdict}; would run {p.num_prompts}x{p.num_new_tokens} greedy and "
                            f"{p.teacher_seqs}x{p.teacher_positions} teacher-forced, then torch vs triton"))
    return rows


def kv_cache_dtypes(ctx: Context) -> list[Row]:
    rows = []
    for kv in KV_DTYPES:
        r = _resolve(ctx, dtype="bfloat16", kv_cache_dtype=kv)
        for backend in BACKENDS:
            verdict = _check(H200_CAPABILITY, kv_cache_dtype=kv, dtype="bfloat16", attention_backend=backend)
            rows.append(Row(f"bfloat16 KV {kv} {backend}", f"{r.bytes_per_block // 1024} KiB/block", "dry-run",
                            f"H200 {verdict}; would compare teacher-forced top-1 with the bf16 cache"))
    a100 = _check(A100_CAPABILITY, kv_cache_dtype="fp8", dtype="bfloat16", attention_backend="triton")
    rows.append(row_for("fp8 KV + triton on an A100", a100.startswith("refused"), a100[:28], a100))
    return rows


def sampling(ctx: Context) -> list[Row]:
    SamplingParams = need("kvtide.workers.sampling_params.SamplingParams")
    SamplingParams(n=2, temperature=1.5, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.1, logprobs=5, seed=7)
    return [Row("seeded n=2 with logprobs 5, twice", "", "dry-run",
                "would check logprobs (finite, <= 0, sorted, consistent) and that one seed gives one output")]


def vs_transformers(ctx: Context) -> list[Row]:
    """transformers' Llama on the meta device holds the same parameters as kvtide's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **{k: v for k, v in ctx.shared["hf_config"].items() if k != "model_type"})
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
        ours = need("kvtide.workers.models.llama.LlamaForCausalLM")(
            need("kvtide.workers.models.llama.LlamaArgs").from_hf_config(ctx.shared["hf_config"])
        )
    count = {name: sum(p.numel() for p in {id(p): p for p in m.parameters()}.values()) for name, m in (("hf", hf), ("ours", ours))}
    return [
        row_for("transformers twin on meta", count["hf"] == count["ours"], f"{count['hf'] / 1e6:.2f}M params",
                f"kvtide {count['ours'] / 1e6:.2f}M", **count),
        Row("teacher-forced top-1, bf16 and fp32", "", "dry-run",
            f"would compare {ctx.plan.teacher_seqs}x{ctx.plan.teacher_positions} next tokens with transformers"),
    ]  # fmt: skip


def nccl(ctx: Context) -> list[Row]:
    import torch.distributed as dist

    built = dist.is_available() and dist.is_nccl_available()
    return [Row("1-rank NCCL group, all_reduce, shard", "", "dry-run",
                f"NCCL in this torch: {built}; would all_reduce on the group and run the bf16 engine in it")]


def memory(ctx: Context) -> list[Row]:
    sizing = "kvtide.workers.sizing."
    ModelShape, ParallelLayout = need(sizing + "ModelShape"), need(sizing + "ParallelLayout")
    shape, layout, p = ModelShape.from_hf_config(ctx.shared["hf_config"]), ParallelLayout(), ctx.plan
    rows = []
    for kv in ("auto", *KV_DTYPES):
        kv_dtype = None if kv == "auto" else need(sizing + "KV_CACHE_DTYPES")[kv]
        plan = need(sizing + "plan_kv_cache")(
            shape, dtype=torch.bfloat16, block_size=p.block_size, memory=need(sizing + "GpuMemory")(H200_TOTAL_BYTES, 0.9),
            layout=layout, kv_cache_dtype=kv_dtype, max_model_len=ctx.shared["hf_config"]["max_position_embeddings"],
            max_num_batched_tokens=p.max_num_batched_tokens, max_num_seqs=p.max_num_seqs,
        )  # fmt: skip
        s = plan.binding
        rows.append(Row(f"H200 bf16, KV {kv}: predicted", f"{plan.num_blocks} blocks", "dry-run",
                        f"{plan.num_tokens / 1e6:.2f}M tokens; weights {s.share.weight_bytes / 2**20:.0f} MiB, "
                        f"reserve {s.reserve_bytes / 2**20:.0f} MiB (estimated) of 139 GiB x 0.9",
                        {"num_blocks": plan.num_blocks, "weight_bytes": s.share.weight_bytes, "reserve_bytes": s.reserve_bytes}))
    return rows


def host_syncs(ctx: Context) -> list[Row]:
    return [Row(f"{b}: one decode step", "", "dry-run", "would count torch.cuda.set_sync_debug_mode('warn') warnings; "
                "1 expected (the sampled tokens)") for b in BACKENDS]  # fmt: skip


def decode_speed(ctx: Context) -> list[Row]:
    sizing = "kvtide.workers.sizing."
    shape = need(sizing + "ModelShape").from_hf_config(ctx.shared["hf_config"])
    weights = need(sizing + "gpu_shares")(shape, need(sizing + "ParallelLayout")(), torch.bfloat16)[0].weight_bytes
    bandwidth = need("kvtide.workers.gpu_catalog.get_gpu")("h200").bandwidth_bytes_per_s
    return [Row(f"{n} streams: weight-read floor", f"{n * bandwidth / weights:.0f} tok/s", "dry-run",
                f"{weights / 2**20:.0f} MiB of bf16 weights per step at the H200's 4.8 TB/s; would time "
                f"{ctx.plan.decode_steps} decode steps of kvtide and of transformers") for n in ctx.plan.streams]
