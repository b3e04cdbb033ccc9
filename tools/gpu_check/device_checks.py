"""Device sections: a one-rank NCCL group, memory against the sizing function, host syncs
per step, and decode speed against the weight-read floor and transformers."""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import Context, common_prefix, engine, greedy, need, need_cuda, release
from plan import BACKENDS
from report import NotAvailable, Row, fraction, row_for

GiB = 2**30


def _resolved(ctx: Context, **options):
    EngineConfig = need("kvtide.workers.config.EngineConfig")
    resolve_engine = need("kvtide.workers.config.resolve_engine")
    p = ctx.plan
    return resolve_engine(EngineConfig.from_kwargs(
        model=str(ctx.model_dir), device=ctx.device, block_size=p.block_size, max_num_seqs=p.max_num_seqs,
        max_num_batched_tokens=p.max_num_batched_tokens, **options,
    ))  # fmt: skip


def nccl(ctx: Context) -> list[Row]:
    import torch.distributed as dist

    backend = "nccl" if ctx.device == "cuda" else "gloo"  # gloo: the check of this check, on a CPU
    if backend == "nccl" and not dist.is_nccl_available():
        raise NotAvailable("NCCL in this torch build")
    TensorParallel = need("kvtide.workers.parallel.TensorParallel")
    load_model = need("kvtide.workers.model_loader.load_model")
    Engine = need("kvtide.workers.engine.Engine")
    device = torch.device(ctx.device, 0) if backend == "nccl" else torch.device("cpu")
    store = dist.FileStore(str(Path(tempfile.mkdtemp()) / "store"), 1)
    if backend == "nccl":
        torch.cuda.set_device(device)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, device_id=device)
    else:
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        x = torch.full((1 << 20,), 3.0, device=device)
        group = dist.new_group([0], backend=backend)
        dist.all_reduce(x, group=group)
        reduced = bool((x == 3.0).all())  # one rank: the sum is itself
        model = load_model(str(ctx.model_dir), torch.bfloat16, device, tp=TensorParallel(0, 1, group))
        eng = Engine.from_model(model, _resolved(ctx, dtype="bfloat16", attention_backend="triton", num_blocks=ctx.plan.num_blocks))
        tokens = greedy(eng, ctx.prompts(ctx.shared["vocab_size"]), ctx.plan.num_new_tokens)
        del eng, model
    finally:
        dist.destroy_process_group()
        release()
    version = f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}" if backend == "nccl" else backend
    rows = [row_for(f"all_reduce on a 1-rank {backend} group", reduced, "sum correct" if reduced else "wrong sum", version)]
    ref = ctx.shared.get("engines", {}).get(("bfloat16", "triton", "auto"))
    if ref is None:
        rows.append(Row("shard in the group: greedy", f"{len(tokens)} runs", "info", "no reference engine ran"))
    else:
        same, prefix = common_prefix(tokens, ref["greedy"])
        rows.append(row_for("shard in the group vs plain engine", same == len(tokens),
                            f"{same}/{len(tokens)} identical", f"{prefix:.0%} shared prefix"))  # fmt: skip
    return rows


def memory(ctx: Context) -> list[Row]:
    need_cuda(ctx, "measured GPU memory")
    sizing = "kvtide.workers.sizing."
    ModelShape, ParallelLayout = need(sizing + "ModelShape"), need(sizing + "ParallelLayout")
    gpu_shares, estimate = need(sizing + "gpu_shares"), need(sizing + "estimate_reserve_bytes")
    plan_kv_cache, GpuMemory = need(sizing + "plan_kv_cache"), need(sizing + "GpuMemory")
    load_model, ShardRunner = need("kvtide.workers.model_loader.load_model"), need("kvtide.workers.shard.ShardRunner")
    Engine, SamplingParams = need("kvtide.workers.engine.Engine"), need("kvtide.workers.sampling_params.SamplingParams")
    p, dtype, util = ctx.plan, torch.bfloat16, 0.9
    tokens, seqs = p.max_num_batched_tokens, p.max_num_seqs
    resolved = _resolved(ctx, dtype="bfloat16", gpu_memory_utilization=util)
    shape = ModelShape.from_hf_config(ctx.shared["hf_config"])
    share = gpu_shares(shape, ParallelLayout(), dtype)[0]
    predicted_reserve = estimate(shape, ParallelLayout(), share, dtype, tokens, seqs)
    _, total = torch.cuda.mem_get_info()
    predicted = plan_kv_cache(shape, dtype=dtype, block_size=p.block_size, memory=GpuMemory(total, util),
                              max_num_batched_tokens=tokens, max_num_seqs=seqs)  # fmt: skip
    base = torch.cuda.memory_allocated()
    model = load_model(str(ctx.model_dir), dtype, torch.device(ctx.device))
    allocated = torch.cuda.memory_allocated() - base
    params = sum(t.numel() * t.element_size() for t in {id(q): q for q in model.parameters()}.values())
    measured = ShardRunner(model, None, p.block_size, attention_backend=resolved.attention_backend).measure_memory(tokens, seqs)
    free, total = torch.cuda.mem_get_info()
    not_torch = max(0, total - free - torch.cuda.memory_reserved())  # the CUDA context: the estimate leaves it out
    activations = measured.reserve_bytes - not_torch
    eng = Engine.from_model(model, resolved)
    with_kv = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    prompt = tokens // seqs  # one step of the full budget: every sequence prefills at once
    for i in range(seqs):
        ids = [3 + (i * 7 + j) % (ctx.shared["vocab_size"] - 3) for j in range(prompt)]
        eng.add_request(f"m{i}", ids, SamplingParams(max_tokens=4, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    torch.cuda.synchronize()
    peak, blocks = torch.cuda.max_memory_allocated(), eng.config.num_blocks
    del eng, model
    release()
    return [
        row_for("weights: parameters vs sizing", params == share.weight_bytes, f"{params / 2**20:.1f} MiB",
                f"sizing predicts {share.weight_bytes / 2**20:.1f} MiB; {allocated / 2**20:.1f} MiB allocated with buffers",
                measured=params, predicted=share.weight_bytes, allocated=allocated),
        Row("activation reserve", f"{activations / GiB:.2f} GiB measured",
            "ok" if activations <= predicted_reserve else "warn",
            f"estimate_reserve_bytes says {predicted_reserve / GiB:.2f} GiB ({fraction(activations, predicted_reserve)}); "
            f"warn when the estimate is below the measurement", {"measured": activations, "predicted": predicted_reserve}),
        Row("CUDA context and other non-torch memory", f"{not_torch / GiB:.2f} GiB", "ok" if not_torch <= total * (1 - util) else "warn",
            f"in the {1 - util:.0%} headroom ({total * (1 - util) / GiB:.1f} GiB) that sizing leaves for it",
            {"not_torch": not_torch, "headroom": total * (1 - util)}),
        Row("KV blocks", f"{blocks} engine", "info",
            f"{predicted.num_blocks} predicted from the estimate, {total / GiB:.1f} GiB x {util}",
            {"engine": blocks, "predicted": predicted.num_blocks, "total_bytes": total}),
        row_for("peak of a full step vs budget", peak <= total * util, f"{peak / GiB:.2f} GiB peak",
                f"budget {total * util / GiB:.2f} GiB; beyond weights+KV {(peak - with_kv) / GiB:.2f} GiB",
                peak=peak, with_kv=with_kv, budget=total * util),
    ]  # fmt: skip


def host_syncs(ctx: Context) -> list[Row]:
    need_cuda(ctx, "torch.cuda.set_sync_debug_mode")
    SamplingParams = need("kvtide.workers.sampling_params.SamplingParams")
    rows = []
    for backend in BACKENDS:
        eng = engine(ctx, dtype="bfloat16", attention_backend=backend)
        try:
            for i, prompt in enumerate(ctx.prompts(ctx.shared["vocab_size"])):
                eng.add_request(f"s{i}", prompt, SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.8, logprobs=2))
            eng.step()  # prefill
            eng.step()  # first decode: compiles and caches whatever it needs
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    eng.step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
        finally:
            del eng
            release()
        # NOTE: set_sync_debug_mode itself warns that the mode is a prototype; not a sync.
        syncs = [w for w in caught if "synchroniz" in str(w.message) and "prototype" not in str(w.message)]
        where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
        if backend == "torch":  # the CPU path and the Triton kernels' oracle: a per-sequence loop
            rows.append(Row(f"{backend}: syncs in one decode step", str(len(syncs)), "info",
                            f"the torch twin reads sequence lengths per layer; at {', '.join(where[:6]) or '-'}",
                            {"syncs": len(syncs), "where": where}))  # fmt: skip
            continue
        rows.append(row_for(f"{backend}: syncs in one decode step", len(syncs) <= 1, str(len(syncs)),
                            f"expected 1 (the sampled tokens); at {', '.join(where[:6]) or '-'}",
                            syncs=len(syncs), where=where))  # fmt: skip
    return rows


def read_bandwidth(num_bytes: int = 2 * GiB, repeats: int = 10) -> float:
    """Bytes per second that a reduction reads from device memory."""
    x = torch.ones(num_bytes // 2, dtype=torch.bfloat16, device="cuda")
    x.sum()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        x.sum()
    end.record()
    torch.cuda.synchronize()
    del x
    return num_bytes * repeats / (start.elapsed_time(end) / 1e3)


def decode_speed(ctx: Context) -> list[Row]:
    SamplingParams = need("kvtide.workers.sampling_params.SamplingParams")
    p, prompt_len, vocab = ctx.plan, 16, ctx.shared["vocab_size"]
    bandwidth = read_bandwidth() if ctx.device == "cuda" else None
    eng = engine(ctx, dtype="bfloat16")
    weights = _weight_bytes(ctx.shared["hf_config"], torch.bfloat16)
    ours = {}
    try:
        for streams in p.streams:
            for i in range(streams):
                eng.add_request(f"d{streams}-{i}", [3 + (i * 31 + j) % (vocab - 3) for j in range(prompt_len)],
                                SamplingParams(temperature=0.0, max_tokens=p.decode_steps + p.warmup_steps + 2, ignore_eos=True))
            for _ in range(1 + p.warmup_steps):  # prefill, then warm decodes
                eng.step()
            t0 = time.perf_counter()
            for _ in range(p.decode_steps):
                eng.step()  # each ends reading its tokens: timed to the device's completion
            ours[streams] = streams * p.decode_steps / (time.perf_counter() - t0)
            while eng.has_unfinished_requests():
                eng.step()
    finally:
        del eng
        release()
    hf = _transformers_decode(ctx, prompt_len)
    rows = []
    if bandwidth is not None:
        rows.append(Row("HBM read bandwidth", f"{bandwidth / 1e12:.2f} TB/s", "info", "bf16 sum over 2 GiB",
                        {"bytes_per_s": bandwidth}))  # fmt: skip
    for streams, rate in ours.items():
        floor = streams * bandwidth / weights if bandwidth else None
        detail = f"weight-read floor {floor:.0f} tok/s ({fraction(rate, floor)} of it)" if floor else "no floor off CUDA"
        if streams in hf:
            detail += f"; transformers bf16 {hf[streams]:.0f} tok/s (kvtide x{rate / hf[streams]:.2f})"
        rows.append(Row(f"kvtide bf16 decode, {streams} streams", f"{rate:.0f} tok/s", "info", detail,
                        {"tok_s": rate, "floor_tok_s": floor, "transformers_tok_s": hf.get(streams)}))
    return rows


def _sync(ctx: Context) -> None:
    if ctx.device == "cuda":
        torch.cuda.synchronize()


def _weight_bytes(hf_config: dict, dtype: torch.dtype) -> int:
    """What one decode step reads at least: the weights, as sizing counts them (the memory
    section checks that count against the loaded parameters)."""
    sizing = "kvtide.workers.sizing."
    shape = need(sizing + "ModelShape").from_hf_config(hf_config)
    return need(sizing + "gpu_shares")(shape, need(sizing + "ParallelLayout")(), dtype)[0].weight_bytes


def _transformers_decode(ctx: Context, prompt_len: int) -> dict[int, float]:
    """transformers bf16 decode tokens/s per stream count: (t(1 + steps) - t(1)) of generate."""
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        return {}
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(ctx.model_dir), dtype=torch.bfloat16).to(ctx.device).eval()
    steps, rates = ctx.plan.decode_steps, {}

    def timed(model, ids, new: int) -> float:
        _sync(ctx)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0)  # fmt: skip
        _sync(ctx)
        return time.perf_counter() - t0

    try:
        with torch.inference_mode():
            for streams in ctx.plan.streams:
                ids = torch.randint(3, ctx.shared["vocab_size"], (streams, prompt_len), device=ctx.device)
                timed(model, ids, 4)  # warm
                rates[streams] = streams * steps / max(timed(model, ids, 1 + steps) - timed(model, ids, 1), 1e-9)
    finally:
        del model
        release()
    return rates
