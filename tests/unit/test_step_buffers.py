"""Persistent per-step buffers: a step's integer inputs as views of one buffer, uploaded once."""

from __future__ import annotations

import pytest
import torch

from kvtide.workers.step_buffers import StepBuffers
from kvtide.workers.step_inputs import BatchState, ChunkDelta, StepDelta, pack_batch


def _rows():
    # two decodes (one-token chunks) then a prefill chunk of 3 tokens starting at position 4
    return [([7], 5, [3, 1], True), ([8], 2, [2], True), ([9, 10, 11], 4, [4, 5], True)]


def _expected():
    return {
        "input_ids": [7, 8, 9, 10, 11],
        "positions": [5, 2, 4, 5, 6],
        "slots": [1 * 4 + 1, 2 * 4 + 2, 5 * 4 + 0, 5 * 4 + 1, 5 * 4 + 2],
        "decode_tables": [[3, 1], [2, 0]],
        "decode_lens": [6, 3],
        "prefill_tables": [[4, 5]],
        "logits": [0, 1, 4],
    }


def _check(inputs) -> None:
    want = _expected()
    assert inputs.input_ids.tolist() == want["input_ids"]
    assert inputs.positions.tolist() == want["positions"]
    assert inputs.meta.slot_mapping.tolist() == want["slots"]
    assert inputs.meta.decode_block_tables.tolist() == want["decode_tables"]
    assert inputs.meta.decode_seq_lens.tolist() == want["decode_lens"]
    assert inputs.meta.prefill_block_tables.tolist() == want["prefill_tables"]
    assert inputs.meta.prefill_query_start_loc_t.tolist() == [0, 3]
    assert inputs.meta.prefill_seq_lens_t.tolist() == [7]
    assert inputs.logits_indices.tolist() == want["logits"]
    for t in (inputs.input_ids, inputs.meta.decode_block_tables):
        assert t.dtype == torch.int64


def test_a_packed_step_has_every_field_and_its_tensors_share_one_buffer():
    buffers = StepBuffers(torch.device("cpu"))
    inputs = pack_batch(_rows(), (), 4, torch.device("cpu"), buffers)
    _check(inputs)
    base = inputs.input_ids.untyped_storage().data_ptr()
    views = (inputs.positions, inputs.meta.slot_mapping, inputs.meta.decode_block_tables, inputs.logits_indices)
    assert all(t.untyped_storage().data_ptr() == base for t in views)
    assert buffers.num_uploads == 1


def test_the_buffer_is_reused_across_steps_and_grows_when_a_step_needs_more():
    buffers = StepBuffers(torch.device("cpu"))
    first = pack_batch(_rows(), (), 4, torch.device("cpu"), buffers)
    storage = first.input_ids.untyped_storage().data_ptr()
    second = pack_batch(_rows(), (), 4, torch.device("cpu"), buffers)
    _check(second)
    assert second.input_ids.untyped_storage().data_ptr() == storage  # no new allocation
    big = [(list(range(3000)), 0, list(range(800)), True)]
    third = pack_batch(big, (), 4, torch.device("cpu"), buffers)
    assert third.input_ids.tolist() == list(range(3000))
    assert third.meta.prefill_block_tables.tolist() == [list(range(800))]
    assert third.meta.slot_mapping[-1].item() == 2999  # block 749, offset 3
    assert buffers.num_uploads == 3


def test_empty_parts_are_empty_tensors_of_the_right_shape():
    inputs = pack_batch([([1, 2], 0, [0], True)], (), 4, torch.device("cpu"))
    assert inputs.meta.decode_block_tables.shape == (0, 0)
    assert inputs.meta.decode_seq_lens.shape == (0,)


def test_a_shard_packs_every_step_into_its_persistent_buffers():
    shard = BatchState(4, torch.device("cpu"))
    for step in range(3):
        delta = StepDelta((ChunkDelta(f"r{step}", 0, (1, 2, 3), True, 0, (step,)),), (), (), False)
        inputs = shard.apply(delta)
        assert inputs.input_ids.tolist() == [1, 2, 3]
        assert inputs.meta.prefill_block_tables.tolist() == [[step]]
    assert shard.buffers.num_uploads == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_step_is_one_non_blocking_copy_of_the_same_values():
    buffers = StepBuffers(torch.device("cuda"))
    for _ in range(3):  # both host buffers, then the first again (guarded by its event)
        inputs = pack_batch(_rows(), (), 4, torch.device("cuda"), buffers)
        assert inputs.input_ids.device.type == "cuda"
        _check(inputs)
    assert buffers.num_uploads == 3
    assert all(h.is_pinned() for h in buffers._host)
