"""A CPU model's weights live in one mapping advised for huge pages, with their shapes, strides
and ties, and load the same values as before."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch

from kvtide.workers import huge_pages
from kvtide.workers.model_loader import load_model
from tests.tiny import write_tiny_llama


def _mapping_range(mapping: mmap.mmap) -> tuple[int, int]:
    start = torch.frombuffer(mapping, dtype=torch.uint8).data_ptr()
    return start, start + len(mapping)


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding ``address`` in /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("tie", [False, True])
def test_loaded_weights_sit_in_the_mapping_with_their_layout_and_values(tmp_path, monkeypatch, tie):
    model_dir = write_tiny_llama(tmp_path / "m", tie_word_embeddings=tie)
    monkeypatch.setenv(huge_pages.ENV, "off")
    plain = load_model(model_dir)
    monkeypatch.delenv(huge_pages.ENV)
    model = load_model(model_dir)
    assert plain._weights_mapping is None
    lo, hi = _mapping_range(model._weights_mapping)
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        assert lo <= p.data_ptr() and p.data_ptr() + p.nbytes <= hi, name
        assert p.data_ptr() % huge_pages.ALIGN == 0 or p.storage_offset(), name
        assert (p.shape, p.stride(), p.dtype) == (q.shape, q.stride(), q.dtype), name
        assert torch.equal(p, q), name
    # The lean CPU loop needs the [out, in] rows contiguous behind each weight_t view.
    assert model.layers[0].self_attn.qkv_proj.weight_t.t().is_contiguous()
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    # A kernel built without transparent huge pages refuses the advice (logged, not an error).
    if hasattr(mmap, "MADV_HUGEPAGE") and Path("/sys/kernel/mm/transparent_hugepage").exists():
        assert "hg" in _vm_flags(lo), "the mapping was not advised for huge pages"


def test_the_switch_names_its_variable_and_value(monkeypatch):
    monkeypatch.setenv(huge_pages.ENV, "yes")
    with pytest.raises(ValueError, match=r"KVTIDE_HUGE_PAGES must be 'on' or 'off', got 'yes'"):
        huge_pages.place_parameters(torch.nn.Linear(4, 4))


def test_a_module_without_cpu_parameters_gets_no_mapping():
    assert huge_pages.place_parameters(torch.nn.ReLU()) is None
