"""A CPU model's weights in one mapping backed by 2 MiB pages.

Why: a decode step reads every weight once (538 MB for SmolLM2 in fp32), front to back. On
4 KiB pages that is ~131,000 TLB misses a step, and the CPUs' stream prefetchers stop at each
4 KiB boundary. Linux gives an anonymous mapping transparent huge pages when it is advised to
(``MADV_HUGEPAGE``; most distributions ship ``enabled=madvise``), and torch's allocator never
advises. On the Zen 4 host, a batch-1 step's linears and LM head took 14.65 ms on 4 KiB pages
and 8.95 ms on 2 MiB pages (1.62x; batch 2 1.37x, batch 8 1.11x; bench/README.md, "Weights on
huge pages").

How: after ``materialize`` gives the parameters uninitialized storage, each storage gets a
region of one anonymous mapping, advised before any page is touched, so the checkpoint's
copy faults it in as huge pages. Parameters keep their shapes, strides and ties (one region
per storage). Where the platform has no ``MADV_HUGEPAGE`` the mapping is still used, on
normal pages.
"""

from __future__ import annotations

import logging
import mmap
import os

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ALIGN = 64
"""Each storage starts on a cache line."""
ENV = "KVTIDE_HUGE_PAGES"
"""``off`` leaves the parameters where torch put them (for A/B runs)."""


def place_parameters(module: torch.nn.Module) -> mmap.mmap | None:
    """Move every CPU parameter's storage of ``module`` into one mapping advised for huge
    pages; the contents are not copied (call it on uninitialized storage). Returns the mapping,
    which the caller keeps alive with the module, or None when there is nothing to place (or
    ``KVTIDE_HUGE_PAGES=off``)."""
    choice = os.environ.get(ENV, "on")
    if choice not in ("on", "off"):
        raise ValueError(f"{ENV} must be 'on' or 'off', got {choice!r}")
    if choice == "off":
        return None
    params = {id(p): p for p in module.parameters() if p.device.type == "cpu"}.values()
    offsets: dict[int, int] = {}  # storage data_ptr -> byte offset in the mapping
    size = 0
    for p in params:
        storage = p.untyped_storage()
        if storage.data_ptr() not in offsets:
            offsets[storage.data_ptr()] = size
            size += -(-storage.nbytes() // ALIGN) * ALIGN
    if not size:
        return None
    mapping, whole, start = _advised(size)
    for p in params:
        base = start + offsets[p.untyped_storage().data_ptr()]
        flat = whole.view(p.dtype)  # the mapping is a whole number of huge pages: divisible
        p.data = flat.as_strided(p.size(), p.stride(), base // p.element_size() + p.storage_offset())
    return mapping


def empty(numel: int) -> tuple[torch.Tensor, mmap.mmap]:
    """An uninitialized fp32 tensor on huge pages, and its mapping (keep both alive): the buffer
    the benchmarks' read-bandwidth floor sums, so that it is read as the weights are."""
    mapping, whole, start = _advised(numel * 4)
    return whole[start : start + numel * 4].view(torch.float32), mapping


def _advised(size: int) -> tuple[mmap.mmap, torch.Tensor, int]:
    """A mapping with at least ``size`` bytes after its first huge page boundary, advised for
    huge pages before any page is touched: (the mapping, all of it as uint8, that boundary's
    offset)."""
    # NOTE: private: Python's default for an anonymous mapping is shared, which is shmem and
    # follows shmem_enabled (usually never) instead of the madvise.
    mapping = mmap.mmap(-1, -(-size // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError) as exc:  # no MADV_HUGEPAGE here, or THP compiled out
        log.info("normal pages: madvise(MADV_HUGEPAGE) unavailable (%s)", exc)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    return mapping, whole, -whole.data_ptr() % HUGE_PAGE
