"""The lean fp32 CPU loop over the decoder layers (workers/models/llama_cpu.py) gives the module
path's logits bit for bit, on every kind of step: prefill above the kernel's row limit, mixed
decode and prefill, all-decode at few rows and above the limit, a pipeline stage's slice; and
it stands aside where it would not be exact (bf16, quantized weights, the torch backend)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtide.kernels import cpu_attention, cpu_linear, cpu_ops
from kvtide.workers.attention import TorchAttentionBackend
from kvtide.workers.model_loader import load_model
from kvtide.workers.models.llama_cpu import CpuDecoderStack
from kvtide.workers.shard import ShardRunner
from kvtide.workers.step_inputs import pack_batch

from tests.tiny import write_tiny_llama

pytestmark = pytest.mark.skipif(
    not (cpu_ops.available() and cpu_linear.available() and cpu_attention.available()),
    reason="the CPU kernels are not built",
)

BLOCK = 4
MANY = 50  # one-token requests: an all-decode step above the few-row tiles (MKL, or AVX2's panels)


def tables() -> dict[str, list[int]]:
    t = {"a": list(range(0, 4)), "b": list(range(4, 16)), "c": list(range(16, 20))}
    t.update({f"s{i}": [20 + i] for i in range(MANY)})
    return t


def steps() -> list[list[tuple[list[int], int, str]]]:
    """(token ids, start position, table name) per chunk; decodes first, as the scheduler orders."""
    a, b, c = [5, 17, 33, 41, 60, 7, 7, 8, 90], list(range(20, 60)), [3, 9, 27, 81, 50, 11]
    return [
        [(a, 0, "a"), (b, 0, "b")],  # prefill, 49 rows: MKL or the panels, and the prefill kernel
        [([12], 9, "a"), ([13], 40, "b"), (c, 0, "c")],  # mixed, 8 rows: the small-M kernel
        [([14], 10, "a"), ([15], 41, "b"), ([16], 6, "c")],  # all decode, 3 rows
        [([17], 42, "b")],  # all decode, 1 row: the kernel reads q in place in the qkv buffer
        [([(7 * i) % 90 + 1], 0, f"s{i}") for i in range(MANY)],  # all decode, 50 rows
    ]


def run(models, use_stack: bool) -> list[torch.Tensor]:
    """Every step through ``models`` (one, or the stages of a pipeline in order), each with its
    own fresh cache; the logits of each step."""
    shards = [ShardRunner(m, 20 + MANY, BLOCK, attention_backend="cpu") for m in models]
    t = tables()
    logits = []
    with torch.inference_mode():
        for step in steps():
            inputs = pack_batch([(ids, start, t[name], True) for ids, start, name in step], (), BLOCK, torch.device("cpu"))
            hidden = residual = None
            for model, shard in zip(models, shards, strict=True):
                model.use_cpu_stack = use_stack
                hidden, residual = model(
                    inputs.input_ids, inputs.positions, shard.kv_caches, inputs.meta, shard.backend, hidden, residual
                )
            logits.append(models[-1].compute_logits(hidden[inputs.logits_indices]))
    return logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("stack") / "tiny", num_layers=3)


@pytest.fixture(scope="module")
def tiny_d24(tmp_path_factory) -> Path:  # head_dim 24: the decode kernel's generic path
    return write_tiny_llama(tmp_path_factory.mktemp("stack24") / "tiny", num_heads=6, num_kv_heads=2, head_dim=24)


@pytest.mark.parametrize("which", ["tiny", "tiny_d24"])
def test_stack_gives_the_module_paths_logits_bit_for_bit(request, which, monkeypatch):
    model = load_model(request.getfixturevalue(which), torch.float32)
    calls = []
    forward = CpuDecoderStack.forward
    monkeypatch.setattr(CpuDecoderStack, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    want = run([model], use_stack=False)
    assert not calls
    got = run([model], use_stack=True)
    assert len(calls) == len(steps())  # every step took the loop
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"step {step}: max |diff| {(g - w).abs().max().item()}"


def test_pipeline_stages_through_the_stack_equal_the_whole_model(tiny):
    whole = load_model(tiny, torch.float32)
    stages = [load_model(tiny, torch.float32, layer_end=2), load_model(tiny, torch.float32, layer_start=2)]
    want = run([whole], use_stack=False)
    got = run(stages, use_stack=True)
    assert all(m._cpu_stack() is not None for m in stages)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype, quantization", [(torch.bfloat16, "none"), (torch.float32, "int8")])
def test_stack_stands_aside_where_it_would_not_be_exact(tiny, dtype, quantization):
    assert CpuDecoderStack.build(load_model(tiny, dtype, quantization=quantization)) is None


def test_stack_stands_aside_for_the_torch_backend(tiny):
    model = load_model(tiny, torch.float32)
    shard = ShardRunner(model, 8, BLOCK, attention_backend="cpu")
    hidden = torch.zeros(2, model.args.hidden_size)
    assert model._cpu_stack().fits(hidden, shard.kv_caches, shard.backend)
    assert not model._cpu_stack().fits(hidden, shard.kv_caches, TorchAttentionBackend())
