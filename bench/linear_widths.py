"""The small-M linear kernel's tile width for one and two rows of x: kvtide's (``NT1``/``NT2`` in
kernels/cpu_linear.py) against the general tile's ``NT`` that those rows used before, fp32.

Run:  .venv/bin/python bench/linear_widths.py [--reps 11] [--threads 2]

Builds the kernel's source twice (the second with ``NT1 = NT2 = NT``) into a temporary
directory, then times, interleaved rep by rep, a SmolLM2 step's 120 layer linears and its tied
LM head (49152 x 576) at 1 and 2 rows with each build. Medians in ms, and old/new.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time

import torch
from torch.utils.cpp_extension import load_inline

from kvtide.kernels import cpu_linear

LAYER_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # [out, in]


def build(name: str, source: str, directory: str):
    return load_inline(name=name, cpp_sources=[source], functions=["linear"], build_directory=directory,
                       extra_cflags=list(cpu_linear.EXTENSION.cflags), verbose=False)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    source = cpu_linear._SOURCE
    old = re.sub(r"NT1 = \d+, NT2 = \d+", "NT1 = NT, NT2 = NT", source)
    if old == source or "NT1 = NT," in source:
        raise SystemExit("kernels/cpu_linear.py has no NT1/NT2 constants to compare")
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        kernels = {"new": build("linear_widths_new", source, a), "old": build("linear_widths_old", old, b)}
    torch.manual_seed(0)
    layers = [torch.randn(o, i) * 0.02 for _ in range(30) for o, i in LAYER_SHAPES]
    head = torch.randn(49152, 576) * 0.02
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ISA {torch.backends.cpu.get_cpu_capability()}")
    for m in (1, 2):
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        outs = {id(w): torch.empty(m, w.shape[0]) for w in [*layers, head]}
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.reps + 1):  # the first rep warms up
            for label, mod in kernels.items():
                for part, ws in (("layers", layers), ("head", [head])):
                    t0 = time.perf_counter()
                    for w in ws:
                        mod.linear(outs[id(w)], xs[w.shape[1]], w)
                    times.setdefault((label, part), []).append(time.perf_counter() - t0)
        med = {k: 1e3 * statistics.median(v[1:]) for k, v in times.items()}
        print(f"rows {m}: " + "; ".join(
            f"{part} new {med['new', part]:.2f} ms, old {med['old', part]:.2f} ms, old/new {med['old', part] / med['new', part]:.2f}x"
            for part in ("layers", "head")
        ))  # fmt: skip


if __name__ == "__main__":
    main()
