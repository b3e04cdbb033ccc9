"""Persistent per-step input buffers: one host-to-device transfer per step, no allocations.

A step's integer inputs (input ids, positions, slot mapping, sequence lengths, query starts,
sampled rows, block tables) are written into one flat int64 host buffer and reach the device
in one copy; the step's tensors are views of one persistent device buffer. Both buffers grow
(to the next power of two) when a step needs more and are reused otherwise.

On CUDA the host side is pinned memory and the copy is non-blocking, so preparing the inputs
never waits for the GPU. Two host buffers alternate, each guarded by an event recorded after
its copy: step N+1 writes the other buffer while step N's copy may still be queued, and step
N+2 waits (rarely: the step's one sync, reading the sampled tokens, usually came first) until
step N's copy has read its buffer. Reusing the device buffer needs no guard: the copy and the
kernels that read the previous step's views are on the same stream, in order.

On CPU the host buffer is the device buffer: the views are of it, with no copy at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StepBuffers:
    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._host: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64)] * (2 if self._cuda else 1)
        self._host_np = [h.numpy() for h in self._host]
        """numpy views of the host buffers (made once per buffer: written without torch calls)."""
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._device_buf = torch.empty(0, dtype=torch.int64, device=self.device)
        self.num_uploads = 0
        """Steps uploaded (one host-to-device copy each on CUDA): for tests."""

    def upload(self, vectors: Sequence[Sequence[int]], tables: Sequence[Sequence[Sequence[int]]]) -> list[torch.Tensor]:
        """``vectors`` as 1-D int64 tensors, then each of ``tables`` as a 2-D [rows, widest]
        int64 tensor (short rows padded with 0), all views of the device buffer, valid until
        the next ``upload``."""
        widths = [max((len(r) for r in t), default=0) for t in tables]
        total = sum(len(v) for v in vectors) + sum(len(t) * w for t, w in zip(tables, widths, strict=True))
        host, flat = self._host_buffer(total)
        shapes, at = [], 0
        for v in vectors:
            flat[at : at + len(v)] = v
            shapes.append((at, (len(v),)))
            at += len(v)
        for t, w in zip(tables, widths, strict=True):
            start = at
            for row in t:
                flat[at : at + len(row)] = row
                flat[at + len(row) : at + w] = 0
                at += w
            shapes.append((start, (len(t), w)))
        dev = self._to_device(host, total)
        self.num_uploads += 1
        return [dev[a : a + _numel(shape)].view(shape) for a, shape in shapes]

    def _host_buffer(self, n: int):
        turn = self._turn
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # its last copy has read it
        if self._host[turn].numel() < n:
            self._host[turn] = torch.empty(_grown(n), dtype=torch.int64, pin_memory=self._cuda)
            self._host_np[turn] = self._host[turn].numpy()
        return self._host[turn], self._host_np[turn]

    def _to_device(self, host: torch.Tensor, n: int) -> torch.Tensor:
        if not self._cuda:
            return host  # the views are of the host buffer itself
        if self._device_buf.numel() < n:
            self._device_buf = torch.empty(_grown(n), dtype=torch.int64, device=self.device)
        self._device_buf[:n].copy_(host[:n], non_blocking=True)
        event = self._copied[self._turn] = torch.cuda.Event()
        event.record()
        self._turn ^= 1
        return self._device_buf


def _grown(n: int) -> int:
    return max(1024, 1 << max(0, n - 1).bit_length())


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out
