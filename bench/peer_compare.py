"""The offline comparison bench/peers.py runs: workloads, alternating pairs of processes, report.

Each system runs in its own process (kvtide in this repo's .venv, vLLM in its venv), one at
a time, so neither competes with the other for the cores; the order alternates pair by pair
so a drift in the machine's load hits both. See bench/peers.py for what is measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from peer_kvtide_offline import import_engine_throughput
from peer_records import Job, Result, Summary, Workload, decode_rate, summarize

SYSTEMS = ("kvtide", "vllm")
SCRIPTS = {"kvtide": "peer_kvtide_offline.py", "vllm": "peer_vllm_offline.py"}
WORKLOADS = ("mixed", "prefill-heavy", "decode-heavy", "shared-prefix")
SINGLE_ISL = 128
CHILD_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Pair:
    """One process of each system, with one engine configuration, running these workloads."""

    label: str
    workloads: tuple[Workload, ...]
    prefix_caching: bool
    single: bool


@dataclass(frozen=True)
class Settings:
    pythons: dict[str, Path]
    model_dir: Path
    out_dir: Path
    env: dict[str, str]
    """The environment peers.py started with (engine_throughput's import changes this one)."""
    threads: int
    kv_cache_gib: int
    max_num_seqs: int
    max_num_batched_tokens: int


def build_workloads(et, names: list[str], vocab_size: int, seed: int, quick: bool) -> dict[str, Workload]:
    """Token-id prompts with fixed seeds; ``et`` is bench/engine_throughput.py (its mixed one)."""
    out: dict[str, Workload] = {}
    if "mixed" in names:
        isl, osl = (et.QUICK_ISL_RANGE, et.QUICK_OSL_RANGE) if quick else (et.ISL_RANGE, et.OSL_RANGE)
        w = et.make_workload(8 if quick else 48, vocab_size, seed, isl, osl)
        out["mixed"] = Workload("mixed", w.prompts, w.osls)

    def uniform(name: str, k: int, n: int, isl: tuple[int, int], osl: tuple[int, int]) -> Workload:
        rng = random.Random(seed + k)
        isls = [rng.randint(*isl) for _ in range(n)]
        return Workload(name, [[rng.randrange(vocab_size) for _ in range(m)] for m in isls],
                        [rng.randint(*osl) for _ in range(n)])

    if "prefill-heavy" in names:
        out["prefill-heavy"] = uniform("prefill-heavy", 11, *((4, (192, 384), (4, 8)) if quick else (16, (384, 1024), (4, 16))))
    if "decode-heavy" in names:
        out["decode-heavy"] = uniform("decode-heavy", 12, *((4, (16, 64), (32, 64)) if quick else (16, (16, 64), (128, 320))))
    if "shared-prefix" in names:
        # Users of each system prompt arrive interleaved; prefixes are whole blocks of both
        # systems (kvtide 16 tokens, vLLM's CPU default 128).
        groups, users, prefix_len = (2, 4, 256) if quick else (4, 8, 512)
        rng = random.Random(seed + 13)
        prefixes = [[rng.randrange(vocab_size) for _ in range(prefix_len)] for _ in range(groups)]
        prompts, osls = [], []
        for _ in range(users):
            for g in range(groups):
                prompts.append(prefixes[g] + [rng.randrange(vocab_size) for _ in range(rng.randint(16, 64))])
                osls.append(rng.randint(*((8, 16) if quick else (16, 48))))
        out["shared-prefix"] = Workload("shared-prefix", prompts, osls)
    return out


def plan_pairs(workloads: dict[str, Workload], mixed_pairs: int, other_pairs: int) -> list[Pair]:
    uncached = [workloads[n] for n in ("prefill-heavy", "decode-heavy") if n in workloads]
    n = max(mixed_pairs if "mixed" in workloads else 0, other_pairs if uncached else 0)
    pairs = []
    for i in range(n):
        wl = ([workloads["mixed"]] if "mixed" in workloads and i < mixed_pairs else []) + (uncached if i < other_pairs else [])
        pairs.append(Pair(f"pair-{i + 1}", tuple(wl), prefix_caching=False, single=True))
    if "shared-prefix" in workloads:
        pairs += [Pair(f"shared-{i + 1}", (workloads["shared-prefix"],), True, False) for i in range(other_pairs)]
    return pairs


def run_system(system: str, job: Job, label: str, s: Settings) -> Result:
    stem = s.out_dir / f"{label}-{system}"
    job_path, out_path, log_path = (stem.with_suffix(x) for x in (".job.json", ".result.json", ".log"))
    job.dump(job_path)
    cmd = [str(s.pythons[system]), str(Path(__file__).parent / SCRIPTS[system]), "--job", str(job_path), "--out", str(out_path)]
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=s.env, timeout=CHILD_TIMEOUT_S).returncode
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(f"{system} ({label}) exited with {rc}; last lines of {log_path}:\n" + "\n".join(tail))
    print(f"  [{label}] {system} done in {time.perf_counter() - t0:.0f} s (load included; log {log_path.name})", flush=True)
    return Result.load(out_path)


def fmt(s: Summary) -> str:
    return (f"{s.wall_s:6.1f} s  {s.output_tok_s:6.1f} out tok/s  {s.requests_s:5.2f} req/s  "
            f"TTFT mean {s.ttft_mean_ms:7.0f} p90 {s.ttft_p90_ms:7.0f} ms  ITL mean {s.itl_mean_ms:5.0f} p90 {s.itl_p90_ms:5.0f} ms")


RATIOS = (("out tok/s", "output_tok_s"), ("req/s", "requests_s"), ("TTFT mean", "ttft_mean_ms"),
          ("TTFT p90", "ttft_p90_ms"), ("ITL mean", "itl_mean_ms"), ("ITL p90", "itl_p90_ms"))


def ratios(k: Summary, v: Summary) -> dict[str, float]:
    return {name: getattr(k, f) / getattr(v, f) for name, f in RATIOS}


def report_workload(w: Workload, runs: list[tuple[str, Result, Result]], et) -> float:
    """Prints one workload's table; returns the median kvtide/vLLM output tok/s ratio."""
    print(f"\n== {w.name}: {len(w.prompts)} requests, {sum(map(len, w.prompts))} prompt tokens, "
          f"{w.num_output_tokens} output tokens")
    print(f"   ISL: {et.quantiles([len(p) for p in w.prompts])}")
    print(f"   OSL: {et.quantiles(w.osls)}")
    per_pair = []
    for label, kv, vl in runs:
        sums = {}
        for r in (kv, vl):
            run = next(x for x in r.runs if x.workload == w.name)
            sums[r.system] = summarize(run, w)
            extra = f"{run.num_cached_prompt_tokens} prompt tokens cached"
            if run.num_preemptions is not None:
                extra += f", {run.num_preemptions} preemptions"
            print(f"   {label} {r.system:>6}: {fmt(sums[r.system])}  [{extra}]")
        rr = ratios(sums["kvtide"], sums["vllm"])
        per_pair.append(rr)
        print(f"   {label} kvtide/vllm: " + "  ".join(f"{n} {x:.2f}x" for n, x in rr.items()))
    med = {n: statistics.median(r[n] for r in per_pair) for n, _ in RATIOS}
    print(f"   median of {len(per_pair)}: " + "  ".join(f"{n} {x:.2f}x" for n, x in med.items())
          + "   (throughput: >1 kvtide ahead; latency: <1 kvtide ahead)")
    return med["out tok/s"]


def report_single(runs: list[tuple[str, Result, Result]], new_tokens: int) -> None:
    print(f"\n== single stream: ISL {SINGLE_ISL}, {new_tokens} new tokens; decode rate excludes the "
          "prefill and first token; floor = weight bytes / the fastest read bandwidth sampled beside "
          "the kvtide process's reps (a 1 GiB sum on huge pages; the slowest sample in brackets)")
    pair_ratios, rep_ratios = [], []
    for label, kv, vl in runs:
        floor_ms = 1e3 * kv.floor["weight_bytes"] / (kv.floor["read_gbs"] * 1e9)
        line, rates = [], {}
        for r in (kv, vl):
            rs = [decode_rate(t) for t in r.single_token_times_s]
            rate, step = statistics.median(x[0] for x in rs), statistics.median(x[1] for x in rs)
            rates[r.system] = rate
            line.append(f"{r.system} {rate:.1f} tok/s (median step {step:.1f} ms = {step / floor_ms:.2f}x floor)")
        pair_ratios.append(rates["kvtide"] / rates["vllm"])
        print(f"   {label}: " + ", ".join(line) + f"; floor {kv.floor['weight_bytes'] / 1e6:.0f} MB / "
              f"{kv.floor['read_gbs']:.1f} GB/s = {floor_ms:.1f} ms"
              + (f" [{kv.floor['read_gbs_slowest']:.1f} GB/s]" if "read_gbs_slowest" in kv.floor else "")
              + f"; kvtide/vllm {pair_ratios[-1]:.2f}x")
        by_rep = rep_floor_ratios(kv)
        if by_rep:
            rep_ratios.extend(by_rep)
            print(f"   {label}: kvtide rep by rep, median step / the floor at the faster of the samples "
                  f"just before and after it: {' '.join(f'{x:.2f}x' for x in by_rep)}")
    print(f"   median kvtide/vllm single-stream decode: {statistics.median(pair_ratios):.2f}x")
    if rep_ratios:
        print(f"   median kvtide step / floor, rep by rep: {statistics.median(rep_ratios):.2f}x "
              f"({len(rep_ratios)} reps)")


def rep_floor_ratios(kv: Result) -> list[float]:
    """Each single-stream rep's median step over the floor at that rep's own moment: the faster
    of the read samples taken just before and just after it. The host's read rate moves by 2x
    from minute to minute (31-62 GB/s within one process on the Zen 4 host), so the run's
    fastest sample can come from a minute none of the reps saw."""
    samples = kv.floor.get("read_gbs_samples")
    if not samples or len(samples) != len(kv.single_token_times_s) + 1:
        return []
    out = []
    for i, times in enumerate(kv.single_token_times_s):
        floor_ms = 1e3 * kv.floor["weight_bytes"] / (max(samples[i], samples[i + 1]) * 1e9)
        out.append(decode_rate(times)[1] / floor_ms)
    return out


def compare(args: argparse.Namespace, s: Settings) -> None:
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
    et = import_engine_throughput(args.threads)
    model_dir = s.model_dir
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    workloads = build_workloads(et, names, vocab, args.seed, args.quick)
    pairs = plan_pairs(workloads, args.pairs or (1 if args.quick else 3), args.other_pairs)
    rng = random.Random(args.seed + 1)
    single_prompt = [rng.randrange(vocab) for _ in range(SINGLE_ISL)]
    single_new = 16 if args.quick else 64
    print(f"load average at start: {os.getloadavg()[0]:.2f} (on {os.cpu_count()} cores; other processes skew timings)")
    print(f"model {model_dir} fp32; {args.threads} threads each; max_num_seqs {s.max_num_seqs}, "
          f"{s.max_num_batched_tokens} tokens/step, {s.kv_cache_gib} GiB KV cache; seed {args.seed}"
          f"{'; QUICK' if args.quick else ''}; raw results in {s.out_dir}", flush=True)
    digest = engine_digest()
    print(f"kvtide source: {engine_source()}", flush=True)
    results: dict[tuple[str, str], Result] = {}
    failures = []
    for i, pair in enumerate(pairs):
        job = Job(str(model_dir), args.threads, pair.prefix_caching, s.max_num_seqs, s.max_num_batched_tokens,
                  s.kv_cache_gib, list(pair.workloads), single_prompt if pair.single else [],
                  single_new if pair.single else 0, (2 if args.quick else 3) if pair.single else 0,
                  args.kvtide_queue_order, args.vllm_shortest_first)
        for system in SYSTEMS if i % 2 == 0 else SYSTEMS[::-1]:
            try:
                results[pair.label, system] = run_system(system, job, pair.label, s)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:  # report the pairs that ran
                failures.append(f"{pair.label} {system}: {exc}")
                print(f"  [{pair.label}] {system} FAILED; this pair is left out of the report", flush=True)
    pairs = [p for p in pairs if (p.label, "kvtide") in results and (p.label, "vllm") in results]
    changed = digest != engine_digest()

    for system in SYSTEMS:
        r = next((results[p.label, system] for p in pairs), None)
        if r is not None:
            print(f"{system} {r.version}: " + "; ".join(r.notes))
    ratio = float("nan")
    for name, w in workloads.items():
        runs = [(p.label, results[p.label, "kvtide"], results[p.label, "vllm"]) for p in pairs if any(x.name == name for x in p.workloads)]
        if not runs:
            continue
        med = report_workload(w, runs, et)
        if name == "mixed":
            ratio = med
    singles = [(p.label, results[p.label, "kvtide"], results[p.label, "vllm"]) for p in pairs if p.single]
    if singles:
        report_single(singles, single_new)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    if changed:
        print(f"WARNING: kvtide's engine files changed on disk during the run (now {engine_source()}): pairs may differ")
    for f in failures:
        print(f"FAILED: {f}")
    print(f"ratio_vs_vllm: {ratio:.2f}" + ("" if "mixed" in workloads else "  (mixed workload not run)"))
    if failures:
        raise SystemExit(1)


def engine_digest() -> str:
    """A digest of kvtide's engine files as they are on disk (other engineers may edit the
    tree while a run is going)."""
    repo = Path(__file__).resolve().parent.parent
    digest = hashlib.sha1()
    for path in sorted(p for d in ("workers", "kernels") for p in (repo / d).rglob("*") if p.suffix in (".py", ".cpp")):
        digest.update(str(path.relative_to(repo)).encode() + path.read_bytes())
    return digest.hexdigest()[:10]


def engine_source() -> str:
    repo = Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True).stdout.rstrip()  # noqa: E731
    changed = git("status", "--porcelain", "--", "workers", "kernels").splitlines()
    return (f"commit {git('rev-parse', '--short', 'HEAD')}, workers/ + kernels/ digest {engine_digest()}"
            + (f" ({len(changed)} files differ from the commit)" if changed else ""))
