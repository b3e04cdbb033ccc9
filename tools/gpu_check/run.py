"""``make gpu-check``: kvtide's check of one bare CUDA machine, without Ray, servers or network.

    python tools/gpu_check/run.py [--quick] [--dry-run] [--out PATH] [--only a,b]

It links kvtide's folders onto sys.path and unpacks the carried wheels (bootstrap.py; fetch
them first, where PyPI is reachable, with ``--fetch-wheels``), writes a random SmolLM2-shaped
checkpoint, and runs each section (sections.py) timed and on its own: a failure is a FAIL
row and the next section runs; a CUDA error that poisons the context moves the remaining
sections to a fresh process. It prints a table and writes a JSON summary (``--out``, default
$OUT/gpu_check.json when $OUT is set, else ./gpu_check.json), and a .txt of the table beside.
``--quick`` is sized for under 5 minutes on one H200 and the full run for under 8 (plan.py
says how). ``--dry-run`` needs no CUDA: imports, the model on the meta device, configs
resolved for a cuda device, sizing predictions, the gpu tests collected; exit 0 unless one
of those fails. Exit 1 when a section failed, 2 when there is no CUDA device to check.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.monotonic()  # the time budget counts from here: imports and CUDA start-up included
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import bootstrap
from plan import make_plan
from report import NotAvailable, Row, SectionResult, summary, table, to_json


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the < 5 minute plan (default: the < 8 minute one)")
    p.add_argument("--dry-run", action="store_true", help="run only what needs no CUDA")
    p.add_argument("--out", type=Path, default=None, help="the JSON summary's path")
    p.add_argument("--only", default=None, help="comma list of sections to run (default: all)")
    p.add_argument("--work-dir", type=Path, default=REPO / "build" / "gpu_check", help="links, checkpoint, logs")
    p.add_argument("--wheels", type=Path, default=REPO / "build" / "gpu_check" / "wheels", help="carried wheels")
    p.add_argument("--fetch-wheels", action="store_true", help="download the carried wheels into --wheels and exit")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: check this script itself on a machine without CUDA (with --shape tiny)")
    p.add_argument("--shape", choices=("smollm2", "tiny"), default="smollm2", help="the random model's shape")
    p.add_argument("--budget-s", type=float, default=None, help=argparse.SUPPRESS)  # a relaunched child's share
    return p.parse_args(argv)


def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fetch_wheels:
        bootstrap.fetch_wheels(args.wheels)
        print(f"carried wheels in {args.wheels}: {', '.join(sorted(p.name for p in args.wheels.glob('*.whl')))}")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers reads local files only
    if args.device == "cpu":  # before kvtide.kernels loads: Triton kernels on CPU tensors
        os.environ.setdefault("TRITON_INTERPRET", "1")
    site = args.work_dir / "site"
    site.mkdir(parents=True, exist_ok=True)
    wheels = bootstrap.unpack_wheels(args.wheels, site)
    bootstrap.link_tree(REPO, site)
    bootstrap.activate(site)
    sys.path.append(str(REPO))  # tests/tiny.py writes the checkpoint; last, so it shadows nothing

    import torch
    from common import Context, hf_config, short, write_model
    from sections import select

    plan = make_plan("quick" if args.quick else "full")
    budget_s = args.budget_s or plan.budget_s
    ctx = Context(REPO, args.work_dir, plan, args.dry_run, args.device, args.shape)
    log_dir = (args.out or default_out()).parent  # beside the summary: under $OUT it comes back
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx.shared.update(hf_config=hf_config(args.shape), wheels=wheels, log_dir=log_dir)
    ctx.shared["vocab_size"] = ctx.shared["hf_config"]["vocab_size"]
    chosen = select(args.only)
    started, results = T0, []
    meta = {
        "mode": plan.mode, "dry_run": args.dry_run, "argv": sys.argv[1:],
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "budget_s": budget_s,
        "plan": dataclasses.asdict(plan), "estimate_s": {m: make_plan(m).total_estimate_s for m in ("quick", "full")},
        "commit": _commit(), "python": sys.version.split()[0], "torch": torch.__version__,
        "device": args.device, "shape": args.shape,
    }  # fmt: skip
    if not args.dry_run and args.device == "cuda" and not torch.cuda.is_available():
        return _finish(args, [], {**meta, "error": "torch finds no CUDA device; use --dry-run here"}, 2)
    if not args.dry_run and "model" not in [s.name for s in chosen]:
        write_model(ctx.model_dir, args.shape)  # the model section writes it, timed
    for i, section in enumerate(chosen):
        left = budget_s - (time.monotonic() - started)
        result = SectionResult(section.name, section.what, plan.estimate(section.name))
        results.append(result)
        if left < 10 and not args.dry_run:
            result.rows.append(Row("section", "", f"skipped: the run's {budget_s:.0f}s budget is spent"))
            continue
        ctx.started, ctx.cap_s = time.monotonic(), min(plan.cap(section.name), left - 5)
        try:
            result.rows = (section.dry if args.dry_run else section.run)(ctx)
        except NotAvailable as exc:
            result.rows.append(Row("section", "", f"not available: {exc}"))
        except Exception as exc:  # noqa: BLE001 - one section's failure must not stop the others
            result.error = short(exc, 600)
        result.seconds = time.monotonic() - ctx.started
        print(f"[gpu-check] {section.name}: {result.status} ({result.seconds:.0f}s)", file=sys.stderr, flush=True)
        if result.error and not args.dry_run and args.device == "cuda" and not _cuda_usable():
            rest = [s.name for s in chosen[i + 1 :]]
            results += _in_fresh_process(args, rest, budget_s - (time.monotonic() - started))
            break
    meta["elapsed_s"] = time.monotonic() - started
    failed = any(r.status == "FAIL" for r in results)
    return _finish(args, results, meta, 1 if failed else 0)


def _finish(args: argparse.Namespace, results: list[SectionResult], meta: dict, code: int) -> int:
    out = args.out or default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    text = table(results)
    if meta.get("error"):
        text += f"\nerror: {meta['error']}"
    out.write_text(to_json(summary(results, meta)))
    out.with_suffix(".txt").write_text(text + "\n")
    print(text)
    print(f"{'FAIL' if code else 'ok'}: {sum(r.status == 'FAIL' for r in results)} of {len(results)} sections failed; "
          f"summary in {out}")  # fmt: skip
    return code


def _cuda_usable() -> bool:
    """False once a CUDA error has poisoned this process's context (it fails every later call)."""
    import torch

    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add(1).item() == 2.0
    except Exception:  # noqa: BLE001 - any error here means the context is gone
        return False


def _in_fresh_process(args: argparse.Namespace, names: list[str], budget_s: float) -> list[SectionResult]:
    """Run ``names`` in a new process (this one's CUDA context is lost) and take its results."""
    if not names or budget_s < 10:
        return []
    out = Path(tempfile.mkdtemp()) / "rest.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", ",".join(names), "--out", str(out),
           "--work-dir", str(args.work_dir), "--wheels", str(args.wheels), "--budget-s", str(budget_s)]  # fmt: skip
    cmd += ["--device", args.device, "--shape", args.shape] + (["--quick"] if args.quick else [])
    print(f"[gpu-check] CUDA context lost; running {', '.join(names)} in a fresh process", file=sys.stderr)
    try:
        subprocess.run(cmd, timeout=budget_s + 30, stdout=subprocess.DEVNULL, check=False)
        sections = json.loads(out.read_text())["sections"]
    except Exception as exc:  # noqa: BLE001 - the child's failure is reported, not raised
        return [SectionResult(n, "", 0.0, error=f"fresh process failed: {exc}") for n in names]
    found = []
    for s in sections:
        rows = [Row(**r) for r in s["rows"]]
        found.append(SectionResult(s["name"], s["what"] + " (fresh process)", s["estimate_s"], s["seconds"], rows, s["error"]))
    return found


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
