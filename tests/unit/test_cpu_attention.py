"""The compiled CPU decode and prefill kernels against their pure-torch twins."""

from __future__ import annotations

import pytest
import torch

from kvtide.kernels import cpu_attention, cpu_prefill
from kvtide.kernels.attention_ref import paged_decode_attention_ref, paged_prefill_attention_ref
from kvtide.workers.attention import CpuAttentionBackend
from tests.unit.test_attention_ref import _paged_setup

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C++ toolchain to build the kernel")


@pytest.mark.parametrize("block_size", [1, 16, 32])
# Groups of 1, 3, 5 (4 + 1 heads per task) and 8 (two tasks of 4); head_dim 24 takes the generic path.
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim", [(4, 4, 64), (9, 3, 64), (8, 1, 128), (6, 2, 16), (10, 2, 32), (4, 2, 24)]
)
@pytest.mark.parametrize("tiled", [True, False], ids=["tiled", "per-key"])
def test_matches_the_torch_twin(block_size, num_heads, num_kv_heads, head_dim, tiled):
    seq_lens = [1, 15, 16, 17, 33, 100]
    k_cache, v_cache, tables, _, _ = _paged_setup(seq_lens, block_size, num_kv_heads, head_dim, seed=5)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(6))
    lens = torch.tensor(seq_lens)
    want = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, head_dim**-0.5)
    got = cpu_attention.paged_decode_attention_cpu(q, k_cache, v_cache, tables, lens, head_dim**-0.5, tiled)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


# A batch of fewer than 2 sequences a thread runs a task per KV head (`tasks` for the whole
# batch), and cuts contexts into parts where those tasks still leave a thread idle.
@pytest.mark.parametrize(
    "seq_lens,num_heads,num_kv_heads,tasks,parts",
    [([1000], 9, 3, 3, 2), ([129], 9, 3, 3, 2), ([300, 7], 4, 1, 2, 2), ([70, 2000], 4, 1, 2, 2),
     ([2000], 5, 1, 1, 4), ([64], 4, 2, 2, 1)],
    ids=["one-long", "two-parts", "an-empty-part", "uneven", "a-head-left-over", "too-short"],
)  # fmt: skip
def test_a_small_batch_cut_into_parts_matches_the_torch_twin(seq_lens, num_heads, num_kv_heads, tasks, parts):
    """Batches of one or two split each context over the threads and merge the parts; a part
    may be empty (the 7-key sequence beside a 300-key one)."""
    module = cpu_attention._module()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert module.decode_splits(tasks, max(seq_lens), 2) == parts
        k_cache, v_cache, tables, _, _ = _paged_setup(seq_lens, 16, num_kv_heads, 64, seed=8)
        q = torch.randn(len(seq_lens), num_heads, 64, generator=torch.Generator().manual_seed(9))
        lens = torch.tensor(seq_lens)
        want = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.125)
        got = cpu_attention.paged_decode_attention_cpu(q, k_cache, v_cache, tables, lens, 0.125)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_the_parts_make_the_tasks_a_multiple_of_the_threads():
    module = cpu_attention._module()
    assert module.decode_splits(3, 1000, 2) == 2  # 3 tasks -> 6, 3 a thread
    assert module.decode_splits(3, 1000, 4) == 4  # 3 -> 12 on 4
    assert module.decode_splits(1, 1000, 2) == 4  # 1 -> 4, 2 a thread
    assert module.decode_splits(1, 190, 2) == 2  # parts of at least 64 keys: 2 of the 2 allowed
    assert module.decode_splits(3, 1000, 1) == 1  # one thread: nothing to share
    assert module.decode_splits(4, 1000, 2) == 1  # 4 tasks already
    assert module.decode_splits(3, 100, 2) == 1  # too short for two parts


def test_a_batch_of_sequences_walks_every_head_of_a_block_together():
    """From 2 sequences a thread each task is a whole sequence, all its KV heads, block by block;
    lengths differ so that the longest-first order matters, and block sizes below and above the
    16-key tile put tiles across blocks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for block_size in (5, 16, 32):
            seq_lens = [3, 700, 16, 129, 45, 1]
            k_cache, v_cache, tables, _, _ = _paged_setup(seq_lens, block_size, 3, 64, seed=10)
            q = torch.randn(len(seq_lens), 9, 64, generator=torch.Generator().manual_seed(11))
            lens = torch.tensor(seq_lens)
            want = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.125)
            got = cpu_attention.paged_decode_attention_cpu(q, k_cache, v_cache, tables, lens, 0.125)
            torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_rejects_what_it_cannot_compute():
    k_cache = torch.zeros(4, 2, 16, 8)
    with pytest.raises(ValueError, match="float32"):
        cpu_attention.paged_decode_attention_cpu(
            torch.zeros(1, 4, 8, dtype=torch.float16), k_cache, k_cache, torch.zeros(1, 1, dtype=torch.long),
            torch.ones(1, dtype=torch.long), 1.0,
        )
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        cpu_attention.paged_decode_attention_cpu(
            torch.zeros(1, 3, 8), k_cache, k_cache, torch.zeros(1, 1, dtype=torch.long),
            torch.ones(1, dtype=torch.long), 1.0,
        )


# -- prefill (kernels/cpu_prefill.py) ------------------------------------------------------------

# (new query tokens, cached prefix before them) per sequence: whole prompts, chunks that
# continue a prompt, a prefix-cache hit, tiles of exactly 16 and one more.
CHUNKS = [[(94, 0), (94, 0)], [(1, 0), (17, 40), (33, 16), (5, 300)], [(16, 0), (17, 15), (300, 0)]]


@pytest.mark.parametrize("chunks", CHUNKS, ids=["prompts", "chunks", "tiles"])
@pytest.mark.parametrize("block_size", [5, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (8, 8, 128), (4, 1, 80), (6, 2, 96)])
# Both task bodies where the build has AVX2 and FMA (elsewhere both are the generic one).
@pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "generic"])
def test_prefill_matches_the_torch_twin(chunks, block_size, num_heads, num_kv_heads, head_dim, blocked):
    seq_lens = [new + cached for new, cached in chunks]
    k_cache, v_cache, tables, _, _ = _paged_setup(seq_lens, block_size, num_kv_heads, head_dim, seed=7)
    starts = [0]
    for new, _ in chunks:
        starts.append(starts[-1] + new)
    # The query as the model hands it over: a view of the fused QKV projection's output.
    qkv = torch.randn(starts[-1], (num_heads + 2 * num_kv_heads) * head_dim, generator=torch.Generator().manual_seed(8))
    q = qkv[:, : num_heads * head_dim].view(-1, num_heads, head_dim)
    scale = head_dim**-0.5
    want = paged_prefill_attention_ref(q, k_cache, v_cache, tables, starts, seq_lens, scale)
    got = cpu_attention.paged_prefill_attention_cpu(
        q, k_cache, v_cache, tables, torch.tensor(starts), torch.tensor(seq_lens), scale, blocked=blocked
    )
    assert not got.isnan().any()  # the cache's unused slots are NaN: none was read
    torch.testing.assert_close(got, want, atol=3e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "capability,vendor,blocked",
    [("AVX2", "AuthenticAMD", True), ("AVX2", "GenuineIntel", True), ("AVX512", "AuthenticAMD", True),
     ("AVX512", "GenuineIntel", False), ("DEFAULT", "AuthenticAMD", False)],
)  # fmt: skip
def test_the_blocked_task_runs_where_it_was_measured_faster(monkeypatch, capability, vendor, blocked):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(cpu_prefill.cpu_simd, "cpu_vendor", lambda: vendor)
    cpu_prefill.blocked_task.cache_clear()
    try:
        assert cpu_prefill.blocked_task() is blocked
    finally:
        cpu_prefill.blocked_task.cache_clear()


def test_prefill_rejects_what_it_cannot_compute():
    k_cache = torch.zeros(4, 2, 16, 48)
    args = (torch.zeros(1, dtype=torch.long).view(1, 1), torch.tensor([0, 3]), torch.tensor([3]), 1.0)
    with pytest.raises(ValueError, match=r"head_dim must be one of \(64, 80, 96, 128\), got 48"):
        cpu_attention.paged_prefill_attention_cpu(torch.zeros(3, 4, 48), k_cache, k_cache, *args)
    k_cache = torch.zeros(4, 2, 16, 64)
    with pytest.raises(ValueError, match="query must be a float32 CPU tensor, got torch.bfloat16"):
        cpu_attention.paged_prefill_attention_cpu(torch.zeros(3, 4, 64, dtype=torch.bfloat16), k_cache, k_cache, *args)
    with pytest.raises(ValueError, match="query_start_loc ends at 3, query has 5 tokens"):
        cpu_attention.paged_prefill_attention_cpu(torch.zeros(5, 4, 64), k_cache, k_cache, *args)


def test_the_cpu_backend_prefills_through_the_kernel_and_quantized_caches_through_the_twin(monkeypatch):
    calls = []
    kernel = cpu_attention.paged_prefill_attention_cpu
    monkeypatch.setattr(cpu_attention, "paged_prefill_attention_cpu", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    monkeypatch.setattr(cpu_prefill, "beats_the_twin", lambda: True)  # an AVX2 or AVX-512 host
    backend = CpuAttentionBackend()
    k_cache, v_cache, tables, _, _ = _paged_setup([20], 16, 2, 64, seed=9)
    q = torch.randn(20, 4, 64)
    out = backend.prefill(q, k_cache, v_cache, tables, [0, 20], [20], 0.125)
    assert calls == [1]
    torch.testing.assert_close(out, paged_prefill_attention_ref(q, k_cache, v_cache, tables, [0, 20], [20], 0.125))
    scales = torch.ones(k_cache.shape[:3])
    backend.prefill(q, k_cache, v_cache, tables, [0, 20], [20], 0.125, scales, scales)
    assert calls == [1]  # a quantized cache (scales given) went to the twin


def test_a_host_without_avx2_prefills_through_the_twin(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_attention, "paged_prefill_attention_cpu", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(cpu_prefill, "beats_the_twin", lambda: False)
    k_cache, v_cache, tables, _, _ = _paged_setup([20], 16, 2, 64, seed=9)
    q = torch.randn(20, 4, 64)
    out = CpuAttentionBackend().prefill(q, k_cache, v_cache, tables, [0, 20], [20], 0.125)
    assert calls == []
    torch.testing.assert_close(out, paged_prefill_attention_ref(q, k_cache, v_cache, tables, [0, 20], [20], 0.125))


@pytest.mark.parametrize("capability,kernel", [("AVX512", True), ("AVX2", True), ("DEFAULT", False)])
def test_the_kernel_prefills_where_it_was_measured_to_beat_the_twin(monkeypatch, capability, kernel):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    cpu_prefill.beats_the_twin.cache_clear()
    try:
        assert cpu_prefill.beats_the_twin() is kernel
    finally:
        cpu_prefill.beats_the_twin.cache_clear()
