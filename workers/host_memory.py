"""glibc malloc settings for a process that runs steps on the CPU.

A step's activations are megabytes each (SmolLM2's gate-up output for a 940-token prefill is
11.5 MB) and live for one layer. glibc serves an allocation above its mmap threshold with a
fresh ``mmap`` and gives freed memory at the top of the heap back to the kernel once it
exceeds its trim threshold; both thresholds adapt upward on their own, but not far enough, so
the pages of every prefill step's activations were unmapped and faulted back in, zero-filled,
the next step: 6,000-40,000 minor faults per 940-token step. With the thresholds fixed, freed
activations stay in the heap and the next step reuses them (a prefill layer's allocations: 7,940
faults in 20 steps with glibc's defaults, under 200 with these; whole workloads and timing in
bench/README.md, "host_memory.py"). vLLM's CPU backend asks users to preload
tcmalloc for the same reason; this keeps glibc and needs no system package.

The cost: the process keeps up to ``TRIM_THRESHOLD`` of freed heap it would otherwise
return, and allocations up to ``MMAP_THRESHOLD`` come from the heap (weights and KV caches
are larger and still get their own mappings).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""mallopt parameter numbers, from glibc's malloc.h."""

MMAP_THRESHOLD = 32 << 20
"""glibc's own ceiling for its adaptive threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)."""
TRIM_THRESHOLD = 256 << 20

ENV = "KVTIDE_HOST_MALLOC"
"""``default`` leaves glibc's adaptive thresholds alone (for A/B runs)."""

_applied: bool | None = None


def keep_step_buffers() -> bool:
    """Fix glibc's mmap and trim thresholds in this process, once. Returns whether they are
    set: False where the C library is not glibc, or with ``KVTIDE_HOST_MALLOC=default``."""
    global _applied
    if _applied is not None:
        return _applied
    choice = os.environ.get(ENV, "tuned")
    if choice not in ("tuned", "default"):
        raise ValueError(f"{ENV} must be 'tuned' or 'default', got {choice!r}")
    _applied = False
    if choice == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt to call
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the mmap/trim thresholds; a step's activations are re-faulted each step")
    _applied = ok
    return ok
