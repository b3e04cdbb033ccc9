"""What crosses between a replica's driver and its shards each step, and how shards unpack it.

The driver sends a ``StepDelta``: only what changed since the previous step. Each scheduled
chunk carries its own token ids (one sampled token for a decode) and the change to its
block table (how many of the entries the shards already hold stay, and which new block ids
follow); requests that ended are named once so the shards drop their tables. Every shard
keeps a ``BatchState`` mirror of the block tables and packs the step's flat batch
(``StepInputs``) itself, so a long-running request does not resend its whole block table
every step, and the pack happens on the shards in parallel instead of on the driver.

The sampling shard (the last stage's TP rank 0) samples on its own device and answers with a
``StepOutput``: token ids, plus the logprobs a request asked for. A request's ``SamplingSpec``
(params, seed, prompt) rides on its first chunk the shards see.

Deltas must be applied in the order they were made: every shard of a replica receives the
same deltas in the same order (one actor call per step per shard, executed in order).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from kvtide.workers.attention import AttentionMetadata
from kvtide.workers.sampler import SampledToken
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.step_buffers import StepBuffers


@dataclass(frozen=True)
class StepInputs:
    """Everything a model shard needs for one step, packed into tensors."""

    input_ids: torch.Tensor
    """Shape (num_tokens,), int64."""
    positions: torch.Tensor
    """Shape (num_tokens,), int64."""
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    """Shape (num_sampled_seqs,): the rows of the batch whose logits are needed."""
    block_copies: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """What the sampling shard needs to sample a request: sent with its first chunk the shards
    see (again after they restart)."""

    params: SamplingParams
    seed: int
    """Seeds the request's generator on the sampling shard's device."""
    prompt_token_ids: tuple[int, ...]
    """For penalties: a prefix-cache hit means the shards never see the cached tokens."""


@dataclass(frozen=True, slots=True)
class ForkSpec:
    """A choice forked from a chunk's request this step, sampled from the same logits row."""

    request_id: str
    seed: int


@dataclass(frozen=True, slots=True)
class StepOutput:
    """The sampling shard's answer: one ``SampledToken`` per sampled row, in plan order (a
    forking chunk's children right after it)."""

    tokens: tuple[SampledToken, ...]


@dataclass(frozen=True, slots=True)
class ChunkDelta:
    """One scheduled chunk: tokens ``[start, start + len(token_ids))`` of ``request_id``."""

    request_id: str
    start: int
    token_ids: tuple[int, ...]
    sample: bool
    keep_blocks: int
    """How many entries of the shards' copy of the block table stay (a preempted request
    restarts from 0; copy-on-write replaces a shared last block)."""
    new_blocks: tuple[int, ...]
    """Block ids appended after the kept entries."""
    spec: SamplingSpec | None = None
    """Set on the first chunk of a request the shards do not know yet."""
    forks: tuple[ForkSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class StepDelta:
    chunks: tuple[ChunkDelta, ...]
    """Decode chunks (one token) first, then prefill chunks, as the scheduler planned them."""
    block_copies: tuple[tuple[int, int], ...]
    freed: tuple[str, ...] = ()
    """Requests that ended since the previous delta: drop their tables (before ``chunks``)."""
    reset: bool = False
    """Drop every table first (the driver lost track, e.g. after the shards restarted)."""
    return_logits: bool = False
    """Tests and benchmarks: the sampling shard returns the logits [num_sampled_seqs, vocab]
    (on the CPU) instead of sampling."""


class DeltaTracker:
    """Driver side: remembers which block-table entries the shards hold, to send only changes."""

    def __init__(self) -> None:
        self._sent: dict[str, list[int]] = {}
        self._freed: list[str] = []
        self._reset = False

    def chunk(
        self,
        request_id: str,
        start: int,
        token_ids: Sequence[int],
        sample: bool,
        table: list[int],
        spec: SamplingSpec | None = None,
        forks: tuple[ForkSpec, ...] = (),
    ) -> ChunkDelta:
        """``spec`` is sent only if the shards do not know the request yet."""
        sent = self._sent.get(request_id)
        if sent is None:
            keep = 0
        elif len(sent) <= len(table) and table[: len(sent)] == sent:
            keep = len(sent)
        else:
            keep = _common_prefix(sent, table)
        self._sent[request_id] = list(table)
        new_spec = spec if sent is None else None
        return ChunkDelta(request_id, start, tuple(token_ids), sample, keep, tuple(table[keep:]), new_spec, forks)

    def knows(self, request_id: str) -> bool:
        """Whether the shards hold the request (its table, and its sampling state)."""
        return request_id in self._sent

    def forget(self, request_id: str) -> None:
        """The request ended: the next delta tells the shards to drop its table."""
        if self._sent.pop(request_id, None) is not None:
            self._freed.append(request_id)

    def reset(self) -> None:
        """The shards start empty (restarted): the next delta resends every table whole."""
        self._sent.clear()
        self._freed.clear()
        self._reset = True

    def delta(self, chunks: Iterable[ChunkDelta], block_copies: tuple[tuple[int, int], ...]) -> StepDelta:
        delta = StepDelta(tuple(chunks), block_copies, tuple(self._freed), self._reset)
        self._freed.clear()
        self._reset = False
        return delta


class BatchState:
    """Shard side: the mirrored block tables, and the packing of each step's flat batch."""

    def __init__(self, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.device = device
        self.tables: dict[str, list[int]] = {}
        self.buffers = StepBuffers(device)

    def apply(self, delta: StepDelta) -> StepInputs:
        if delta.reset:
            self.tables.clear()
        for rid in delta.freed:
            self.tables.pop(rid, None)
        rows = []
        for c in delta.chunks:
            table = self.tables.setdefault(c.request_id, [])
            if c.keep_blocks > len(table):
                raise RuntimeError(
                    f"step delta keeps {c.keep_blocks} blocks of request {c.request_id!r} but this "
                    f"shard holds {len(table)}: deltas were applied out of order or one was lost"
                )
            del table[c.keep_blocks :]
            table.extend(c.new_blocks)
            rows.append((c.token_ids, c.start, table, c.sample))
        return pack_batch(rows, delta.block_copies, self.block_size, self.device, self.buffers)


def pack_batch(
    rows: Iterable[tuple[Sequence[int], int, list[int], bool]],
    block_copies: tuple[tuple[int, int], ...],
    block_size: int,
    device: torch.device,
    buffers: StepBuffers | None = None,
) -> StepInputs:
    """Pack chunks ``(token_ids, start, block_table, sample)`` into one flat batch, no padding.

    Chunks of one token are decodes (paged decode attention); longer ones are prefill chunks.
    The caller orders decodes first. Every tensor is a view of ``buffers`` (the shard's
    persistent ones; a one-off set when None), reaching the device in one copy.
    """
    bs = block_size
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_indices: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    prefill_tables: list[list[int]] = []
    prefill_lens: list[int] = []
    query_start = [0]
    for token_ids, start, table, sample in rows:
        n = len(token_ids)
        end = start + n
        input_ids.extend(token_ids)
        positions.extend(range(start, end))
        slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        if sample:
            logits_indices.append(len(input_ids) - 1)
        if n == 1:
            decode_tables.append(table)
            decode_lens.append(end)
        else:
            prefill_tables.append(table)
            prefill_lens.append(end)
            query_start.append(query_start[-1] + n)

    buffers = buffers or StepBuffers(device)
    ids_t, positions_t, slots_t, decode_lens_t, query_start_t, prefill_lens_t, logits_t, decode_tables_t, prefill_tables_t = (
        buffers.upload((input_ids, positions, slots, decode_lens, query_start, prefill_lens, logits_indices),
                       (decode_tables, prefill_tables))
    )  # fmt: skip
    meta = AttentionMetadata(
        slot_mapping=slots_t,
        num_decode_tokens=len(decode_lens),
        decode_block_tables=decode_tables_t,
        decode_seq_lens=decode_lens_t,
        prefill_block_tables=prefill_tables_t,
        prefill_query_start_loc=query_start,
        prefill_seq_lens=prefill_lens,
        prefill_query_start_loc_t=query_start_t,
        prefill_seq_lens_t=prefill_lens_t,
        max_decode_seq_len=max(decode_lens, default=0),
        max_prefill_query_len=max((b - a for a, b in zip(query_start, query_start[1:])), default=0),
        max_prefill_seq_len=max(prefill_lens, default=0),
    )
    return StepInputs(ids_t, positions_t, meta, logits_t, block_copies)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
