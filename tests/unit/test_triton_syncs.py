"""The Triton kernels' launchers never read device memory back to the host (issue 14).

On a GPU every such read is a sync, and one per layer and kernel adds up to hundreds a step
and rules out CUDA graphs. On the CPU nothing syncs, so ``HostReads`` counts the calls that
would: any read of a tensor's value into Python (``item``, ``tolist``, ``bool``/``int``/
``index``/``float``, ``cpu``, ``numpy``, formatting, ``equal``, data-dependent shapes such as
``nonzero`` or a boolean mask) and any host data or tensor moved to a device (``torch.tensor``,
``as_tensor``, ``.to(device)``). It is a ``TorchFunctionMode``, which sees every torch call
made while it is active, the tensor methods and dunders included.

NOTE: under ``TRITON_INTERPRET=1`` the interpreter itself runs a launched kernel in numpy,
reading every tensor it is given (on a GPU the kernel does that on the device); ``HostReads``
pauses while a launched kernel runs (``InterpretedFunction.run``), so what it counts is the
launchers' own Python. (Triton 3.9's interpreter reads CPU tensors through their pointers,
which no torch call sees; the pause keeps the count right for one that copies through torch.) On a GPU the
``gpu`` test checks the same with ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

# Sets TRITON_INTERPRET before the kernel modules are imported.
from tests.unit.triton_env import INTERPRET

# isort: split
import contextlib
import functools
import warnings
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode
from triton.runtime.interpreter import InterpretedFunction

from kvtide.kernels import triton_decode, triton_kv_write, triton_norm_rope, triton_prefill
from kvtide.kernels.kv_quant import KV_CACHE_DTYPES, allocate_kv_cache
from kvtide.workers.attention import TorchAttentionBackend, TritonAttentionBackend
from kvtide.workers.config import EngineConfig, resolve
from kvtide.workers.engine import Engine
from kvtide.workers.layers import fused
from kvtide.workers.sampler import Sampler, SamplingRow
from kvtide.workers.model_loader import load_model, read_hf_config
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.step_inputs import pack_batch
from tests.tiny import write_tiny_llama

needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need the Triton interpreter")

READS = frozenset({
    "item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__", "__complex__",
    "__format__", "__repr__", "__str__", "__array__", "equal", "allclose", "is_nonzero",
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "repeat_interleave",
})  # fmt: skip
"""Torch calls that hand a tensor's value to Python, or whose output shape depends on it."""
FROM_HOST = frozenset({"tensor", "as_tensor", "asarray", "from_numpy", "cuda"})
"""Torch calls that build a tensor from host data or move one to a device."""


class HostReads(TorchFunctionMode):
    """Counts the torch calls that would sync with (or copy from) the host on a GPU, by name,
    while active and not paused; ``launches`` counts the interpreted kernel launches."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self.launches = 0
        self.paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            name = getattr(func, "__name__", "")
            if name in READS or name in FROM_HOST:
                self.reads[name] += 1
            elif name == "to" and _names_a_device(args[1:], kwargs):
                self.reads["to(device)"] += 1
            elif name in ("__getitem__", "__setitem__") and _bool_index(args[1]):
                self.reads[f"{name}[bool mask]"] += 1
        return func(*args, **kwargs)


def _names_a_device(args, kwargs) -> bool:
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (str, torch.device, torch.Tensor)) or type(a) is int for a in args)


def _bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


@pytest.fixture
def host_reads(monkeypatch) -> HostReads:
    return paused_in_kernels(monkeypatch)


def paused_in_kernels(monkeypatch) -> HostReads:
    """A ``HostReads`` that pauses while the interpreter runs a launched kernel."""
    spy = HostReads()
    run = InterpretedFunction.run

    def paused_run(self, *args, **kwargs):
        spy.launches += 1
        spy.paused += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            spy.paused -= 1

    monkeypatch.setattr(InterpretedFunction, "run", paused_run)
    return spy


def watched(spy: HostReads, fn: Callable, calls: Counter[str], name: str) -> Callable:
    """``fn`` run under ``spy``, its calls counted in ``calls[name]``."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        calls[name] += 1
        with spy:
            return fn(*args, **kwargs)

    return run


def counted(fn: Callable, calls: Counter[str], name: str) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return run


# -- the spy itself ------------------------------------------------------------------------

@needs_interpreter
def test_the_spy_sees_the_reads_the_old_launchers_made(host_reads):
    """What the launchers did before: a min/max read back, offsets copied to the device,
    ``.tolist()`` in a message and ``bool(all())`` in a check. The spy must count each."""
    lens, qsl = torch.tensor([3, 9]), torch.tensor([0, 2, 5])
    with host_reads:
        [int(x) for x in torch.aminmax(lens)]
        torch.as_tensor([0, 2, 5], dtype=torch.int64, device=lens.device)
        qsl.tolist()
        bool((lens >= qsl.diff()).all())
        lens.max().item()
        lens[lens > 4]
        qsl.to(lens.device)
        qsl.to(torch.int32)  # a dtype change stays on its device: not counted
    assert host_reads.reads == Counter(
        {"__int__": 2, "as_tensor": 1, "tolist": 1, "__bool__": 1, "item": 1, "__getitem__[bool mask]": 1,
         "to(device)": 1}
    )


@needs_interpreter
def test_the_spy_counts_interpreted_launches(host_reads):
    key, slots = torch.randn(2, 1, 16), torch.tensor([0, 5])
    cache = torch.zeros(2, 1, 4, 16)
    with host_reads:
        triton_kv_write.write_kv(key, key, cache, cache.clone(), slots)
    assert host_reads.launches == 1 and host_reads.reads == Counter()
    assert torch.equal(cache.view(8, 16)[5], key[1, 0])


# -- the launchers, through the backend ----------------------------------------------------

def mixed_batch(device: torch.device, block_size: int = 4):
    """Decodes first, then prefill chunks (a whole prompt, and one over a cached prefix), packed
    by the engine's own ``pack_batch``: (StepInputs, num_blocks)."""
    rows = [
        ([7], 9, [0, 1, 2], True),  # decode at position 9
        ([3], 4, [3, 4], True),  # decode on a block boundary
        (list(range(6)), 0, [5, 6], True),  # a whole 6-token prompt
        (list(range(5)), 7, [7, 8, 9], False),  # a chunk over a 7-token cached prefix
    ]
    return pack_batch(rows, (), block_size, device), 10


def backend_inputs(device, kv_cache_dtype: str, seed: int = 0):
    inputs, num_blocks = mixed_batch(device)
    num_tokens, heads, kv_heads, head_dim = inputs.input_ids.shape[0], 4, 2, 16
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(num_tokens, h, head_dim, generator=g).to(device) for h in (heads, kv_heads, kv_heads))
    kv_dtype = KV_CACHE_DTYPES.get(kv_cache_dtype, torch.float32)
    caches = [allocate_kv_cache(num_blocks, kv_heads, 4, head_dim, kv_dtype, device) for _ in range(2)]
    # Earlier tokens' K/V: every slot holds something before this step writes its own.
    for cache in caches:
        cache.view(torch.uint8).copy_(torch.randint(0, 50, cache.view(torch.uint8).shape, generator=g))
    return q, k, v, caches, inputs.meta


@needs_interpreter
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
def test_triton_backend_forward_reads_nothing_back(host_reads, kv_cache_dtype):
    q, k, v, (k_cache, v_cache), meta = backend_inputs(torch.device("cpu"), kv_cache_dtype)
    assert 0 < meta.num_decode_tokens < q.shape[0], "a mixed batch"
    want_caches = (k_cache.clone(), v_cache.clone())
    want = TorchAttentionBackend().forward(q, k, v, *want_caches, meta, 0.25)
    backend = TritonAttentionBackend()
    with host_reads:
        got = backend.forward(q, k, v, k_cache, v_cache, meta, 0.25)
    assert host_reads.reads == Counter(), f"host reads in the Triton backend's forward: {dict(host_reads.reads)}"
    assert host_reads.launches == 3  # write_kv, decode (one split off CUDA), prefill
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_engine_steps_through_triton_without_host_reads(tmp_path, monkeypatch, host_reads):
    """Every step of a mixed workload on the Triton path (attention, RMSNorm and rotary, the
    latter two as the layers run them on CUDA) launches kernels and reads nothing back."""
    calls: Counter[str] = Counter()
    monkeypatch.setattr(fused, "triton_usable", lambda *tensors: True)
    monkeypatch.setattr(TritonAttentionBackend, "forward",
                        watched(host_reads, TritonAttentionBackend.forward, calls, "attention"))
    for module, name in ((triton_norm_rope, "rms_norm"), (triton_norm_rope, "rotary_embedding")):
        monkeypatch.setattr(module, name, watched(host_reads, getattr(module, name), calls, name))
    for module, name in ((triton_kv_write, "write_kv"), (triton_decode, "paged_decode_attention"),
                         (triton_prefill, "paged_prefill_attention")):
        monkeypatch.setattr(module, name, counted(getattr(module, name), calls, name))

    model_dir = write_tiny_llama(tmp_path / "tiny")
    config = EngineConfig.from_kwargs(model=str(model_dir), num_blocks=64, block_size=4, max_num_seqs=8,
                                      max_num_batched_tokens=16, attention_backend="triton")
    engine = Engine.from_model(load_model(model_dir), resolve(config, str(model_dir), read_hf_config(model_dir)))
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    # 5 + 8 + 17 prompt tokens under a 16-token budget: prompt c is chunked over its cached
    # prefix, beside the decodes of a and b.
    for rid, prompt in {"a": [5, 17, 33, 41, 60], "b": [7, 7, 8, 90, 12, 13, 40, 41], "c": list(range(20, 37))}.items():
        engine.add_request(rid, prompt, greedy)
    for _ in range(20):
        if not engine.has_unfinished_requests():
            break
        engine.step()
    assert not engine.has_unfinished_requests()
    assert host_reads.reads == Counter(), f"host reads on the Triton path: {dict(host_reads.reads)}"
    assert all(calls[n] for n in ("attention", "rms_norm", "rotary_embedding", "write_kv",
                                  "paged_decode_attention", "paged_prefill_attention")), calls
    assert host_reads.launches >= sum(calls.values()) - calls["attention"]


# -- the same on a GPU ---------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA without the interpreter")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
def test_triton_forward_does_not_sync_on_cuda(kv_cache_dtype):
    device = torch.device("cuda")
    if kv_cache_dtype == "fp8" and torch.cuda.get_device_capability(device) < (8, 9):
        pytest.skip("Triton's fp8 needs compute capability 8.9 (kernels/capability.py)")
    q, k, v, (k_cache, v_cache), meta = backend_inputs(device, kv_cache_dtype)
    want_caches = (k_cache.clone(), v_cache.clone())
    want = TorchAttentionBackend().forward(q, k, v, *want_caches, meta, 0.25)
    backend = TritonAttentionBackend()
    x = torch.randn(q.shape[0], 64, device=device)
    weight = torch.ones(64, device=device)
    cos, sin = torch.ones(q.shape[0], 1, 16, device=device), torch.zeros(q.shape[0], 1, 16, device=device)

    def step() -> torch.Tensor:
        triton_norm_rope.rms_norm(x, weight, 1e-5, x)
        triton_norm_rope.rotary_embedding(q, k, cos, sin)
        return backend.forward(q, k, v, k_cache, v_cache, meta, 0.25)

    step()  # compiles the kernels
    torch.cuda.synchronize()
    with sync_errors():
        got = step()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@contextlib.contextmanager
def sync_errors():
    """A synchronizing CUDA call raises inside the block; the mode is reset however it ends.

    NOTE: setting the mode warns that it is a prototype, and under the suite's warnings-as-errors
    that warning escaped after the mode was set, leaving it on for every later test."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Synchronization debug mode is a prototype")
            torch.cuda.set_sync_debug_mode("error")
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_does_not_sync_on_cuda():
    """Sampling a batch with every parameter that moves host values to the GPU (indices,
    temperatures, top-k, top-p, min-p, penalties, logit bias, logprobs) stays asynchronous;
    only ``to_host`` reads back."""
    device = torch.device("cuda")
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)).to(device)
    full = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.1,
                          presence_penalty=0.2, frequency_penalty=0.1, logit_bias={5: 2.0}, logprobs=3, seed=1)
    rows = [SamplingRow(SamplingParams(temperature=0.0), [1, 2], [3], None, frozenset({7})),
            SamplingRow(full, [1, 2], [3, 4], torch.Generator(device).manual_seed(1), frozenset({7})),
            SamplingRow(SamplingParams(temperature=1.0, top_k=5), [9], [], None, frozenset({7})),
            SamplingRow(SamplingParams(temperature=0.7, logprobs=0), [9], [8], None, frozenset({7}))]  # fmt: skip
    Sampler().sample(logits, rows).to_host()  # warms up whatever allocates on first use
    torch.cuda.synchronize()
    with sync_errors():
        batch = Sampler().sample(logits, rows)
    tokens = batch.to_host()
    assert len(tokens) == 4 and all(0 <= t.token_id < 1000 for t in tokens)
    assert tokens[0].token_id == int(logits[0].argmax())
