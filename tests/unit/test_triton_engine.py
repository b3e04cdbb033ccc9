"""The engine through the Triton backend (interpreter on CPU) and with int8/fp8 KV caches."""

from __future__ import annotations

# Sets TRITON_INTERPRET before the kernel modules are imported.
from tests.unit.triton_env import INTERPRET

# isort: split
import pytest
import torch

from kvtide.workers.config import EngineConfig, resolve
from kvtide.workers.engine import Engine
from kvtide.workers.model_loader import load_model, read_hf_config
from kvtide.workers.sampling_params import SamplingParams

from tests.tiny import tiny_llama_config, write_tiny_llama

NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
# Odd lengths, one exactly on a block boundary (block_size 4), one spanning several blocks.
PROMPTS = {"a": [5, 17, 33, 41, 60], "b": [7, 7, 8, 90, 12, 13, 40, 41], "c": list(range(20, 37))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = write_tiny_llama(tmp_path_factory.mktemp("triton_engine") / "tiny")
    return str(d), load_model(d)


def generate(tiny, **options) -> dict[str, list[int]]:
    model_dir, model = tiny
    opts = {"num_blocks": 64, "block_size": 4, "max_num_seqs": 8, "max_num_batched_tokens": 16}
    opts.update(options)
    config = EngineConfig.from_kwargs(model=model_dir, **opts)
    engine = Engine.from_model(model, resolve(config, model_dir, read_hf_config(model_dir)))
    for rid, prompt in PROMPTS.items():
        engine.add_request(rid, prompt, GREEDY)
    out: dict[str, list[int]] = {rid: [] for rid in PROMPTS}
    for _ in range(100):
        if not engine.has_unfinished_requests():
            break
        for d in engine.step():
            out[d.request_id] += d.token_ids
    assert all(len(t) == NEW_TOKENS for t in out.values()), out
    return out


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors need the Triton interpreter")
def test_triton_backend_matches_torch_greedy(tiny):
    # A 16-token budget splits prompt c into chunks over its cached prefix and mixes decodes
    # with prefills in one step.
    assert generate(tiny, attention_backend="triton") == generate(tiny, attention_backend="torch")


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors need the Triton interpreter")
def test_triton_backend_matches_torch_with_int8_cache(tiny):
    want = generate(tiny, attention_backend="torch", kv_cache_dtype="int8")
    assert generate(tiny, attention_backend="triton", kv_cache_dtype="int8") == want


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_quantized_cache_runs_greedy(tiny, kv_cache_dtype, backend):
    """The quantized cache really holds codes, and greedy output stays close to fp32's: the
    first token of every prompt agrees and at least 3/4 of all tokens do."""
    want = generate(tiny, attention_backend="torch")
    got = generate(tiny, attention_backend=backend, kv_cache_dtype=kv_cache_dtype)
    assert all(got[r][0] == want[r][0] for r in PROMPTS), (got, want)
    same = sum(a == b for r in PROMPTS for a, b in zip(got[r], want[r]))
    assert same >= 0.75 * NEW_TOKENS * len(PROMPTS), (got, want)


def test_quantized_cache_is_allocated_quantized(tiny):
    model_dir, model = tiny
    config = EngineConfig.from_kwargs(model=model_dir, num_blocks=8, block_size=4, kv_cache_dtype="fp8")
    engine = Engine.from_model(model, resolve(config, model_dir, read_hf_config(model_dir)))
    k_cache, v_cache = engine.runner.executor.shard.kv_caches[0]
    # 2 KV heads, 4 tokens of 16 fp8 codes + a 4-byte scale each.
    assert k_cache.dtype == v_cache.dtype == torch.float8_e4m3fn
    assert k_cache.shape == (8, 2, 4 * (16 + 4))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_block_count_grows_with_the_quantized_dtype(head_dim):
    hf = tiny_llama_config(head_dim=head_dim, num_layers=4)
    blocks = {}
    for dtype, kv in (("float32", "auto"), ("float16", "auto"), ("float32", "int8"), ("float16", "fp8")):
        config = EngineConfig.from_kwargs(model="m", dtype=dtype, kv_cache_dtype=kv, kv_cache_memory_gib=0.25,
                                          device="cpu", attention_backend="torch")
        r = resolve(config, "m", hf)
        blocks[dtype, kv] = r.num_blocks
        assert r.kv_cache_bytes <= 0.25 * 2**30
        assert r.describe_kv_cache().startswith(
            f"KV cache ({'int8' if kv == 'int8' else 'float8_e4m3fn' if kv == 'fp8' else dtype}"
        )
        assert f"{r.num_blocks} blocks" in r.describe_kv_cache()
    # A quantized row is head_dim code bytes + a 4-byte scale; fp16 is 2 * head_dim bytes.
    ratio = 2 * head_dim / (head_dim + 4)
    assert blocks["float16", "auto"] == 2 * blocks["float32", "auto"]
    for kv in (("float32", "int8"), ("float16", "fp8")):
        assert blocks[kv] == pytest.approx(ratio * blocks["float16", "auto"], rel=1e-3)
        assert blocks[kv] == pytest.approx(2 * ratio * blocks["float32", "auto"], rel=1e-3)


def test_rejects_an_unknown_kv_cache_dtype():
    config = EngineConfig.from_kwargs(model="m", kv_cache_dtype="fp4")
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of auto, fp8, int8; got 'fp4'"):
        resolve(config, "m", tiny_llama_config())
