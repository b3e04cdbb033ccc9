"""Engine sections: every dtype on both attention backends, quantized KV caches, non-greedy
sampling with logprobs, and bf16 against transformers on the same random weights.

Agreement is measured teacher-forced where it can be: the next token after each prefix of
random sequences (``common.teacher_forced``), so one early difference does not hide the
rest. Free-running greedy runs are compared too (identical sequences, shared prefix).
"""

from __future__ import annotations

import math
import time

from common import (
    CLOSE_K,
    Context,
    close_agreement,
    common_prefix,
    engine,
    generate,
    greedy,
    need,
    release,
    short,
    teacher_forced,
    top1_agreement,
)
from plan import BACKENDS, DTYPES, KV_DTYPES
from report import NotAvailable, Row, row_for

TOP1_MIN = {"float32": 0.98, "bfloat16": 0.90, "float16": 0.90}
"""Least teacher-forced top-1 agreement of two runs in one dtype: rounding in another order
swaps near-tied tokens (bf16 and fp32 transformers agree on 96% of the random model's)."""
CLOSE_MIN = 0.98
"""Least share of positions whose top tokens are each in the other's top ``CLOSE_K``: the
pass criterion (a bug moves the token far down the list; rounding swaps near neighbours)."""
KV_TOP1_WARN, KV_TOP1_FAIL = 0.90, 0.50
"""Quantized KV against the model dtype's cache: below WARN is worth a look, below FAIL is broken."""


def _runs(ctx: Context, label: str, **options) -> tuple[list[Row], dict | None]:
    """Load one engine, run greedy and teacher-forced; one row, plus the results."""
    if ctx.time_left() <= 0:
        return [Row(label, "", "skipped: the section's time cap was reached")], None
    t0, eng = time.monotonic(), None
    vocab = ctx.shared["vocab_size"]
    try:
        eng = engine(ctx, **options)
        cfg = eng.config
        want = {k: v for k, v in options.items() if k in ("dtype", "attention_backend")}
        placed = (
            cfg.device.type == ctx.device
            and str(cfg.dtype).removeprefix("torch.") == want.get("dtype", str(cfg.dtype).removeprefix("torch."))
            and cfg.attention_backend == want.get("attention_backend", cfg.attention_backend)
        )
        tokens = greedy(eng, ctx.prompts(vocab), ctx.plan.num_new_tokens)
        tf = teacher_forced(eng, ctx.teacher_seqs(vocab), ctx.plan.prompt_len)
        where = f"{cfg.device}, {str(cfg.dtype).removeprefix('torch.')}, {cfg.attention_backend}, KV {str(cfg.kv_cache_dtype).removeprefix('torch.')}"
        complete = all(len(t) == ctx.plan.num_new_tokens for t in tokens)
        row = row_for(label, placed and complete, f"{len(tokens)}x{ctx.plan.num_new_tokens} + {len(tf)} tokens",
                      f"{where}; {time.monotonic() - t0:.1f}s")  # fmt: skip
        return [row], {"greedy": tokens, "teacher": tf}
    except NotAvailable:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed engine is a FAIL row; the next one runs
        return [Row(label, "", "FAIL", short(exc))], None
    finally:
        del eng
        release()


def engine_dtypes(ctx: Context) -> list[Row]:
    rows, results = [], ctx.shared.setdefault("engines", {})
    for dtype in DTYPES:
        for backend in BACKENDS:
            got, res = _runs(ctx, f"{dtype} {backend}", dtype=dtype, attention_backend=backend)
            rows += got
            if res is not None:
                results[(dtype, backend, "auto")] = res
        pair = [results.get((dtype, b, "auto")) for b in BACKENDS]
        if None in pair:
            continue
        agree = top1_agreement(pair[0]["teacher"], pair[1]["teacher"])
        close = close_agreement(pair[0]["teacher"], pair[1]["teacher"])
        same, prefix = common_prefix(pair[0]["greedy"], pair[1]["greedy"])
        rows.append(row_for(
            f"{dtype} torch vs triton", agree >= TOP1_MIN[dtype] and close >= CLOSE_MIN,
            f"top-1 {agree:.1%}, close {close:.1%}",
            f"teacher-forced; greedy: {same}/{len(pair[0]['greedy'])} identical, {prefix:.0%} shared prefix; "
            f"needs top-1 >= {TOP1_MIN[dtype]:.0%} and close >= {CLOSE_MIN:.0%}",
            top1=agree, close=close, identical=same, shared_prefix=prefix,
        ))  # fmt: skip
    for dtype in ("bfloat16", "float16"):
        a, b = results.get((dtype, "triton", "auto")), results.get(("float32", "triton", "auto"))
        if a and b:
            agree, close = top1_agreement(a["teacher"], b["teacher"]), close_agreement(a["teacher"], b["teacher"])
            rows.append(Row(f"{dtype} vs float32 (triton)", f"top-1 {agree:.1%}, close {close:.1%}", "info",
                            "rounding of the half dtype", {"top1": agree, "close": close}))  # fmt: skip
    return rows


def kv_cache_dtypes(ctx: Context) -> list[Row]:
    rows, results = [], ctx.shared.setdefault("engines", {})
    capability = _capability() if ctx.device == "cuda" else None
    for kv in KV_DTYPES:
        for backend in BACKENDS:
            refusal = _refusal(capability, kv, backend)
            label = f"bfloat16 KV {kv} {backend}"
            if refusal is not None:
                rows.append(Row(label, "refused before loading", "ok", refusal))
                continue
            got, res = _runs(ctx, label, dtype="bfloat16", attention_backend=backend, kv_cache_dtype=kv)
            rows += got
            ref = results.get(("bfloat16", backend, "auto"))
            if res is None or ref is None:
                continue
            agree, close = top1_agreement(res["teacher"], ref["teacher"]), close_agreement(res["teacher"], ref["teacher"])
            status = "ok" if agree >= KV_TOP1_WARN else "warn" if agree >= KV_TOP1_FAIL else "FAIL"
            rows.append(Row(f"KV {kv} vs bfloat16 ({backend})", f"top-1 {agree:.1%}, close {close:.1%}", status,
                            f"teacher-forced; warn below {KV_TOP1_WARN:.0%} top-1, fail below {KV_TOP1_FAIL:.0%}",
                            {"top1": agree, "close": close}))  # fmt: skip
    return rows


def _capability():
    """(check_dtype_support, compute capability, name) of this GPU, or None when kvtide has no
    capability check yet."""
    try:
        check = need("kvtide.kernels.capability.check_dtype_support")
    except NotAvailable:
        return None
    import torch

    return check, torch.cuda.get_device_capability(), torch.cuda.get_device_name()


def _refusal(capability, kv: str, backend: str) -> str | None:
    if capability is None:
        return None
    check, cc, name = capability
    try:
        check("cuda", cc, kv_cache_dtype=kv, quantization="none", dtype="bfloat16", attention_backend=backend,
              device_name=name)  # fmt: skip
    except ValueError as exc:
        return str(exc)
    return None


def sampling(ctx: Context) -> list[Row]:
    SamplingParams = need("kvtide.workers.sampling_params.SamplingParams")
    vocab, n = ctx.shared["vocab_size"], ctx.plan.num_new_tokens
    seeded = SamplingParams(n=2, temperature=4.0, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.1,
                            presence_penalty=0.3, frequency_penalty=0.2, logprobs=5, seed=7, max_tokens=n,
                            ignore_eos=True)  # fmt: skip
    plain = SamplingParams(temperature=1.0, logprobs=3, max_tokens=n, ignore_eos=True)
    prompts = ctx.prompts(vocab)
    eng = engine(ctx, dtype="bfloat16")
    try:
        first = generate(eng, prompts, seeded)
        again = generate(eng, prompts, seeded)
        unseeded = generate(eng, prompts, plain)
        backend = eng.config.attention_backend
    finally:
        del eng
        release()
    choices = [c for out in first + unseeded for c in out.outputs]
    problems = [p for c in choices for p in _logprob_problems(c, vocab, n)]
    same = [(a.token_ids, [t.logprob for t in a.logprobs]) for o in first for a in o.outputs] == [
        (a.token_ids, [t.logprob for t in a.logprobs]) for o in again for a in o.outputs
    ]
    pairs = [o.outputs for o in first]
    distinct = sum(a.token_ids != b.token_ids for a, b in pairs)
    return [
        row_for("completions and logprobs", not problems, f"{len(choices)} choices x {n} tokens",
                problems[0] if problems else f"backend {backend}; logprobs finite, <= 0, top-k sorted, the "
                "sampled token's logprob equal to its top-k entry", problems=len(problems)),
        row_for("same seed, same tokens", same, "identical" if same else "different", "two runs, seed 7, n=2"),
        Row("n=2 choices differ", f"{distinct}/{len(pairs)} prompts", "info", "temperature 4, top-k 50, top-p 0.9 (random weights: peaked logits)"),
    ]


def _logprob_problems(choice, vocab: int, n: int) -> list[str]:
    found = []
    if len(choice.token_ids) != n or len(choice.logprobs) != n:
        found.append(f"choice {choice.index}: {len(choice.token_ids)} tokens, {len(choice.logprobs)} logprobs, not {n}")
    for i, t in enumerate(choice.logprobs):
        values = [v for _, v in t.top_logprobs]
        top = dict(t.top_logprobs)
        if t.logprob is None or not math.isfinite(t.logprob) or t.logprob > 1e-4:
            found.append(f"token {i}: logprob {t.logprob}")
        elif any(not math.isfinite(v) or v > 1e-4 for v in values) or values != sorted(values, reverse=True):
            found.append(f"token {i}: top logprobs {t.top_logprobs}")
        elif any(not 0 <= tid < vocab for tid in top):
            found.append(f"token {i}: top ids outside the vocabulary: {sorted(top)}")
        elif t.token_id in top and abs(top[t.token_id] - t.logprob) > 1e-3:
            found.append(f"token {i}: logprob {t.logprob} but {top[t.token_id]} in its top-k")
    return found[:3]


def vs_transformers(ctx: Context) -> list[Row]:
    """bf16 (and fp32, the control) against transformers on the same weights, teacher-forced."""
    import torch

    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise NotAvailable(f"transformers ({exc})") from exc
    hf_logging.disable_progress_bar()
    rows, results = [], ctx.shared.setdefault("engines", {})
    vocab, start = ctx.shared["vocab_size"], ctx.plan.prompt_len
    seqs = ctx.teacher_seqs(vocab)
    for dtype, least in (("bfloat16", TOP1_MIN["bfloat16"]), ("float32", 0.99)):
        ours = results.get((dtype, "triton", "auto"))
        if ours is None:
            got, ours = _runs(ctx, f"kvtide {dtype} triton", dtype=dtype, attention_backend="triton")
            rows += got
            if ours is None:
                continue
        model = AutoModelForCausalLM.from_pretrained(str(ctx.model_dir), dtype=getattr(torch, dtype)).to(ctx.device)
        try:
            with torch.inference_mode():
                logits = model(torch.tensor(seqs, device=ctx.device)).logits[:, start - 1 : -1].float()
        finally:
            del model
            release()
        logp = torch.log_softmax(logits, -1).flatten(0, 1)
        top = logits.flatten(0, 1).topk(CLOSE_K, -1)
        hf = [(ids[0], None, frozenset(ids)) for ids in top.indices.tolist()]
        agree, close = top1_agreement(ours["teacher"], hf), close_agreement(ours["teacher"], hf)
        margins = (top.values[:, 0] - top.values[:, 1]).tolist()
        differ = sorted(m for m, a, b in zip(margins, ours["teacher"], hf, strict=True) if a[0] != b[0])
        ours_ids = torch.tensor([t[0] for t in ours["teacher"]], device=logp.device)
        hf_lp = logp.gather(1, ours_ids[:, None])[:, 0].tolist()
        diff = max((abs(a[1] - b) for a, b in zip(ours["teacher"], hf_lp, strict=True) if a[1] is not None), default=float("nan"))
        rows.append(row_for(
            f"{dtype}: kvtide vs transformers", agree >= least and close >= CLOSE_MIN,
            f"top-1 {agree:.1%}, close {close:.1%} of {len(hf)}",
            f"needs top-1 >= {least:.0%} and close >= {CLOSE_MIN:.0%}; where they differ HF's top-2 margin is "
            f"{_median(differ)} (median); max |logprob diff| {diff:.3g}",
            top1=agree, close=close, max_logprob_diff=diff, differing_margins=differ[:20],
        ))  # fmt: skip
    return rows


def _median(values: list[float]) -> str:
    return f"{values[len(values) // 2]:.3g}" if values else "n/a"
