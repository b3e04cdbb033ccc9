"""CPU thread settings, chosen before torch is imported (OpenMP reads them once, at load).

On small shared machines the defaults hurt: OpenMP's ACTIVE wait policy spins idle threads,
so whenever another process holds a core a 2-thread matmul can run 10x slower than on one
thread. kvtide defaults to the PASSIVE policy and to one intra-op thread per core it may use;
``KVTIDE_NUM_THREADS`` / ``--threads`` override it.

PASSIVE alone (no spinning at all) made every parallel region wake a sleeping thread: a decode
step runs ~200 of them (each linear, norm and attention call), and SmolLM2's batch-1 step took
46 ms instead of 32 (batch 8: 64 instead of 44). ``GOMP_SPINCOUNT=10000`` lets a thread spin
~10 us after a region before it sleeps: the step's regions follow each other within that, so
the step runs as fast as with spinning threads, while between steps, and whenever the engine is
idle, the threads sleep (bench/README.md, "Threads").
"""

from __future__ import annotations

import os
import sys


def configure_threads(num_threads: int | None = None) -> int:
    """Set OpenMP/MKL thread settings in the environment; must run before ``import torch``.

    Returns the thread count chosen. If torch is already loaded the environment no longer
    matters, so the count is applied through ``torch.set_num_threads`` instead.
    """
    if num_threads is None:
        env = os.environ.get("KVTIDE_NUM_THREADS")
        num_threads = int(env) if env else len(os.sched_getaffinity(0))
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(num_threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(num_threads)
    return num_threads
