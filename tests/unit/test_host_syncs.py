"""A step reads device memory back to the host once: the sampled tokens, all in one transfer.

On a GPU every such read is a sync (and rules out CUDA graphs). On the CPU nothing syncs, so
the test counts the reads that would: spies on ``Tensor.item``, ``.tolist``, ``.cpu``,
``.numpy``, ``__bool__``, ``__int__``, ``__float__``, ``__index__`` and iteration, switched on
for one engine step (a mixed batch: a prefill chunk beside decodes, greedy and sampled rows,
penalties and logprobs) on the engine's default CPU path.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch

from kvtide.workers import Engine, EngineConfig, SamplingParams, resolve
from kvtide.workers.model_loader import load_model, read_hf_config
from tests.tiny import write_tiny_llama

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "__iter__")


@contextlib.contextmanager
def counting_reads():
    counts: Counter[str] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def spy(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, spy(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    model_dir = write_tiny_llama(tmp_path_factory.mktemp("syncs") / "tiny")
    config = EngineConfig.from_kwargs(model=str(model_dir), num_blocks=64, block_size=4, max_num_batched_tokens=16)
    return Engine.from_model(load_model(model_dir), resolve(config, str(model_dir), read_hf_config(model_dir)))


def test_one_step_reads_the_device_once(engine):
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    fancy = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.2, presence_penalty=0.5,
                           logprobs=3, max_tokens=8, seed=7, ignore_eos=True)  # fmt: skip
    engine.add_request("a", [5, 9, 17, 3], greedy)
    engine.add_request("b", [8, 2, 40, 41, 7], fancy)
    engine.step()  # both prefilled
    engine.add_request("c", list(range(10, 22)), greedy)  # a prefill chunk beside the decodes
    with counting_reads() as reads:
        deltas = engine.step()
    assert {d.request_id for d in deltas} >= {"a", "b"}
    assert reads == Counter({"tolist": 1}), f"host reads in one step: {dict(reads)}"
