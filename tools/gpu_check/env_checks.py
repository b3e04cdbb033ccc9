"""Sections about the machine and the tree: versions, imports, the random model, and the
gpu-marked tests (run in a subprocess, or only collected in a dry run)."""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import bootstrap
from common import Context, need, short, write_model
from report import Row, row_for

USED_API = (
    "kvtide.workers.engine.Engine", "kvtide.workers.llm.LLM", "kvtide.workers.llm.StepFailedError",
    "kvtide.workers.sampling_params.SamplingParams", "kvtide.workers.config.EngineConfig",
    "kvtide.workers.config.resolve", "kvtide.workers.config.resolve_engine", "kvtide.workers.config.kv_plan",
    "kvtide.workers.model_loader.load_model", "kvtide.workers.shard.ShardRunner",
    "kvtide.workers.parallel.TensorParallel", "kvtide.workers.models.llama.LlamaArgs",
    "kvtide.workers.models.llama.LlamaForCausalLM", "kvtide.workers.sizing.plan_kv_cache",
    "kvtide.workers.sizing.estimate_reserve_bytes", "kvtide.workers.sizing.gpu_shares",
    "kvtide.workers.sizing.GpuMemory", "kvtide.workers.sizing.ModelShape", "kvtide.workers.sizing.ParallelLayout",
    "kvtide.workers.gpu_catalog.get_gpu", "kvtide.kernels.capability.check_dtype_support",
)  # fmt: skip
"""Every kvtide name the sections call; a missing one makes its sections say "not available"."""

GPU_TEST_MARK = re.compile(r"^(@pytest\.mark\.gpu\b|pytestmark\b.*\bgpu\b|from tests\.unit\.triton_env import)", re.MULTILINE)
"""A test file with gpu tests marks them, or takes its devices from tests/unit/triton_env.py."""


def environment(ctx: Context) -> list[Row]:
    import torch

    def version(name: str) -> str:
        return bootstrap.installed_version(name) or "missing"

    rows = [
        Row("python", platform.python_version(), "info", sys.executable),
        Row("torch", torch.__version__, "info", f"CUDA {torch.version.cuda}, NCCL built: "
            f"{torch.distributed.is_available() and torch.distributed.is_nccl_available()}"),
        Row("triton / transformers", f"{version('triton')} / {version('transformers')}", "info"),
        Row("kvtide from", str(Path(importlib.import_module("kvtide.workers").__file__).resolve().parent.parent), "info",
            "the repository's folders, linked by package-dir"),
    ]  # fmt: skip
    for w in ctx.shared.get("wheels", []):
        rows.append(Row(f"wheel {w.name}", w.version, "info", w.action))
    for name in bootstrap.missing_carried():
        _, why = bootstrap.CARRIED[name]
        rows.append(Row(f"package {name}", "missing", f"not available: {name}",
                        f"{why}; carry build/gpu_check/wheels (run.py --fetch-wheels where PyPI is reachable)"))  # fmt: skip
    if not ctx.dry_run and ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        rows.append(Row("GPU", props.name, "info", f"compute capability {props.major}.{props.minor}, "
                        f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs, "
                        f"{torch.cuda.device_count()} device(s)"))  # fmt: skip
    return rows


def imports(ctx: Context) -> list[Row]:
    """Import every module of kvtide.workers and kvtide.kernels; look up the names used."""
    rows, count = [], 0
    for package in ("kvtide.workers", "kvtide.kernels", "kvtide.proto"):
        pkg = importlib.import_module(package)
        names = [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")] if package != "kvtide.proto" else []
        for name in names:
            try:
                importlib.import_module(name)
                count += 1
            except Exception as exc:  # noqa: BLE001 - every module that fails is a row
                rows.append(Row(f"import {name}", "fails", "FAIL", short(exc)))
    rows.insert(0, Row("kvtide modules imported", str(count), "ok" if count else "FAIL",
                       "every module of kvtide.workers and kvtide.kernels, and kvtide.proto"))  # fmt: skip
    missing = []
    for dotted in USED_API:
        try:
            need(dotted)
        except Exception:  # noqa: BLE001 - NotAvailable, or an import that fails
            missing.append(dotted.removeprefix("kvtide."))
    rows.append(Row("the API the sections use", f"{len(USED_API) - len(missing)}/{len(USED_API)} present",
                    f"not available: {', '.join(missing)}" if missing else "ok"))  # fmt: skip
    return rows


def model(ctx: Context) -> list[Row]:
    """The SmolLM2-shaped model built on the meta device in each dtype, its parameter bytes
    against the sizing function's; outside a dry run, its random checkpoint written once."""
    import torch

    LlamaArgs = need("kvtide.workers.models.llama.LlamaArgs")
    LlamaForCausalLM = need("kvtide.workers.models.llama.LlamaForCausalLM")
    sizing = "kvtide.workers.sizing."
    shape = need(sizing + "ModelShape").from_hf_config(ctx.shared["hf_config"])
    args = LlamaArgs.from_hf_config(ctx.shared["hf_config"])
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        with torch.device("meta"):
            net = LlamaForCausalLM(args, dtype=dtype)
        unique = {id(p): p for p in net.parameters()}.values()
        num_bytes = sum(p.numel() * p.element_size() for p in unique)
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in unique})
        predicted = need(sizing + "gpu_shares")(shape, need(sizing + "ParallelLayout")(), dtype)[0].weight_bytes
        name = str(dtype).removeprefix("torch.")
        rows.append(row_for(f"meta model {name}", num_bytes == predicted and dtypes == [name],
                            f"{sum(p.numel() for p in unique) / 1e6:.1f}M params, {num_bytes / 2**20:.1f} MiB",
                            f"sizing predicts {predicted / 2**20:.1f} MiB; parameter dtypes {dtypes}",
                            bytes=num_bytes, predicted=predicted))  # fmt: skip
    if not ctx.dry_run:
        t0 = time.monotonic()
        path, written = write_model(ctx.model_dir, ctx.shape)
        size = sum(f.stat().st_size for f in path.iterdir())
        rows.append(Row("random checkpoint", f"{size / 2**20:.0f} MiB", "ok",
                        f"{'written' if written else 'reused'} in {time.monotonic() - t0:.1f}s at {path}"))  # fmt: skip
    return rows


def gpu_test_files(repo: Path) -> list[str]:
    """tests/unit files that hold gpu-marked tests (the others need Ray, servers, hypothesis)."""
    return [
        str(p.relative_to(repo))
        for p in sorted((repo / "tests" / "unit").glob("test_*.py"))
        if GPU_TEST_MARK.search(p.read_text())
    ]


def gpu_tests(ctx: Context, timeout_s: float) -> list[Row]:
    files = gpu_test_files(ctx.repo)
    if not files:
        return [Row("gpu-marked tests", "no files", "FAIL", "no tests/unit file marks a test gpu")]
    # -P: the repository root stays off sys.path; kvtide comes from the linked site folder.
    cmd = [sys.executable, "-P", "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", *files]
    log = ctx.shared.get("log_dir", ctx.work) / ("gpu_tests_collect.log" if ctx.dry_run else "gpu_tests.log")
    cmd += ["--collect-only", "-q"] if ctx.dry_run else ["-v", "-rfEs"]
    t0 = time.monotonic()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(cmd, cwd=ctx.repo, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s,
                                check=False).returncode
        except subprocess.TimeoutExpired:
            rc = None
    text = log.read_text()
    if ctx.dry_run:
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
        collected = int(m[1]) if m else 0
        return [Row("gpu-marked tests", f"{collected} collected in {len(files)} files",
                    "dry-run" if rc == 0 and collected else "FAIL",
                    f"would run: pytest -m gpu {' '.join(Path(f).name for f in files)}"
                    + ("" if rc == 0 else f"; collection exited {rc}: {_tail(text)}"),
                    {"collected": collected, "files": files})]  # fmt: skip
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", _last_line(text))}
    if rc is None:
        counts = {k: len(re.findall(rf" {k.upper()}\b", text)) for k in ("passed", "failed", "skipped")}
    failed = [ln.split(" ")[1] for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    value = ", ".join(f"{n} {k}" for k, n in counts.items()) or "nothing ran"
    ok = rc == 0 and counts.get("passed", 0) > 0  # all skipped: CUDA was not seen, nothing was checked
    detail = (f"timed out after {timeout_s:.0f}s (counts so far)" if rc is None else f"exit {rc}") + \
        f", {time.monotonic() - t0:.0f}s; log {log}" + (f"; failed: {', '.join(failed[:5])}" if failed else "")  # fmt: skip
    return [Row("pytest -m gpu", value, "ok" if ok else "FAIL", detail, {"counts": counts, "failed": failed})]


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _tail(text: str, n: int = 300) -> str:
    return " ".join(text.split())[-n:]
