"""The small-M linear kernel against another build of itself, for one and two rows of x, fp32:
by default kvtide's tile widths (``NT1``/``NT2`` in kernels/cpu_linear.py) against the general
tile's ``NT`` that those rows used before; with ``--rev REV``, kernels/cpu_linear.py as it was at
git revision REV (its own text only: the panels and helpers it pastes in are today's).

Run:  .venv/bin/python bench/linear_widths.py [--reps 11] [--threads 2] [--rows 1,2] [--rev REV]

Builds the two sources into temporary directories, then times, interleaved rep by rep (the
order alternating), a SmolLM2 step's 120 layer linears and its tied LM head (49152 x 576) at
each row count with each build. Medians in ms, old/new of the medians and the median of the
per-rep old/new ratios, and the weight-read floor of the whole step (its bytes over the read
bandwidth of summing 1 GiB, measured in the same reps).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from kvtide.cluster.threads import configure_threads


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,2", help="comma list of row counts")
    p.add_argument("--rev", help="compare with kernels/cpu_linear.py at this git revision")
    return p.parse_args()


ARGS = parse_args()
configure_threads(ARGS.threads)  # the engine's OpenMP settings, before torch loads OpenMP

import torch  # noqa: E402
from torch.utils.cpp_extension import load_inline  # noqa: E402

from kvtide.kernels import cpu_linear  # noqa: E402

LAYER_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # [out, in]


def build(name: str, source: str, directory: str):
    return load_inline(name=name, cpp_sources=[source], functions=["linear"], build_directory=directory,
                       extra_cflags=list(cpu_linear.EXTENSION.cflags), verbose=False)  # fmt: skip


def source_at(rev: str) -> str:
    """kernels/cpu_linear.py's C++ source at git revision ``rev``, with today's pasted-in parts."""
    repo = Path(__file__).resolve().parent.parent
    text = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:kernels/cpu_linear.py"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    namespace = {"__name__": "kvtide.kernels._linear_at_rev", "__package__": "kvtide.kernels"}
    exec(compile(text, f"{rev}:kernels/cpu_linear.py", "exec"), namespace)
    return namespace["_SOURCE"]


def main(args: argparse.Namespace) -> None:
    source = cpu_linear._SOURCE
    if args.rev:
        old = source_at(args.rev)
    else:
        old = re.sub(r"NT1 = \d+, NT2 = \d+", "NT1 = NT, NT2 = NT", source)
        if old == source or "NT1 = NT," in source:
            raise SystemExit("kernels/cpu_linear.py has no NT1/NT2 constants to compare")
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        kernels = {"new": build("linear_widths_new", source, a), "old": build("linear_widths_old", old, b)}
    torch.manual_seed(0)
    layers = [torch.randn(o, i) * 0.02 for _ in range(30) for o, i in LAYER_SHAPES]
    head = torch.randn(49152, 576) * 0.02
    big = torch.ones(2**28)  # 1 GiB: its sum is the read bandwidth
    weight_bytes = sum(w.numel() * 4 for w in [*layers, head])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ISA {torch.backends.cpu.get_cpu_capability()}, "
          f"old: {args.rev or 'NT1 = NT2 = NT'}")  # fmt: skip
    for m in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        outs = {id(w): torch.empty(m, w.shape[0]) for w in [*layers, head]}
        times: dict[tuple[str, str], list[float]] = {}
        sums: list[float] = []
        for rep in range(args.reps + 1):  # the first rep warms up
            t0 = time.perf_counter()
            big.sum()
            sums.append(time.perf_counter() - t0)
            for label in ("new", "old") if rep % 2 else ("old", "new"):
                for part, ws in (("layers", layers), ("head", [head])):
                    t0 = time.perf_counter()
                    for w in ws:
                        kernels[label].linear(outs[id(w)], xs[w.shape[1]], w)
                    times.setdefault((label, part), []).append(time.perf_counter() - t0)
        med = {k: 1e3 * statistics.median(v[1:]) for k, v in times.items()}
        pair = {part: statistics.median(o / n for o, n in zip(times["old", part][1:], times["new", part][1:]))
                for part in ("layers", "head")}  # fmt: skip
        floor_ms = 1e3 * weight_bytes / (big.numel() * 4 / statistics.median(sums[1:]))
        step = {label: med[label, "layers"] + med[label, "head"] for label in ("new", "old")}
        print(f"rows {m}: " + "; ".join(
            f"{part} new {med['new', part]:.2f} ms, old {med['old', part]:.2f} ms, old/new {med['old', part] / med['new', part]:.2f}x "
            f"(pairs {pair[part]:.3f}x)"
            for part in ("layers", "head")
        ) + f"; step new {step['new'] / floor_ms:.2f}x / old {step['old'] / floor_ms:.2f}x the floor of {floor_ms:.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main(ARGS)
