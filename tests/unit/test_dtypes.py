"""Every model dtype on a tiny random Llama (CPU): the engine and the offline API run greedily in
fp32, bf16 and fp16; each tensor is in the dtype chosen for it; the loader builds on the meta
device and allocates nothing beyond the shard in its dtype; the Triton RMSNorm and rotary path
(forced onto CPU tensors under the interpreter) matches the torch path; the fp32 CPU path still
runs the compiled ops; and the offline API raises when a step fails."""

from __future__ import annotations

# Sets TRITON_INTERPRET before the kernel modules are imported.
from tests.unit.triton_env import INTERPRET

# isort: split
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvtide.kernels import cpu_ops
from kvtide.workers.config import EngineConfig, resolve
from kvtide.workers.engine import Engine
from kvtide.workers.layers import fused
from kvtide.workers.layers.norm import RMSNorm
from kvtide.workers.layers.rotary import RotaryEmbedding
from kvtide.workers.llm import LLM, StepFailedError
from kvtide.workers.model_loader import load_model, read_hf_config
from kvtide.workers.models import llama
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.shard import ShardRunner
from kvtide.workers.step_inputs import pack_batch

from tests.tiny import write_tiny_llama

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=1)
PROMPTS = [[5, 17, 33, 41, 60], [7, 7, 8, 90, 12, 13, 40, 41, 3], list(range(20, 37))]
ENGINE_OPTIONS = {"num_blocks": 64, "block_size": 4, "max_num_seqs": 8, "max_num_batched_tokens": 64}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("dtypes") / "tiny")


def engine_for(model_dir: Path, model: llama.LlamaForCausalLM, **options) -> Engine:
    """An engine around ``model``, configured for its dtype."""
    dtype = str(model.dtype).removeprefix("torch.")
    config = EngineConfig.from_kwargs(model=str(model_dir), dtype=dtype, **{**ENGINE_OPTIONS, **options})
    return Engine.from_model(model, resolve(config, str(model_dir), read_hf_config(model_dir)))


def greedy(engine: Engine, prompts=PROMPTS) -> list[list[int]]:
    llm = LLM(engine=engine)
    return [list(out.outputs[0].token_ids) for out in llm.generate(prompts, GREEDY)]


# -- the engine in every dtype -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_llm_runs_greedy_in_every_dtype(tiny_dir, dtype):
    llm = LLM(str(tiny_dir), dtype=dtype, **ENGINE_OPTIONS)
    assert llm.engine.config.dtype == DTYPES[dtype]
    outs = llm.generate(PROMPTS, GREEDY)
    for out in outs:
        (choice,) = out.outputs
        assert len(choice.token_ids) == NEW_TOKENS
        assert all(0 <= t < 96 for t in choice.token_ids)
        assert all(torch.isfinite(torch.tensor(lp.logprob)) for lp in choice.logprobs)


@pytest.mark.parametrize("quantization", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_quantized_weights_run_in_half_precision(tiny_dir, dtype, quantization):
    model = load_model(tiny_dir, DTYPES[dtype], quantization=quantization)
    attn = model.layers[0].self_attn
    assert attn.qkv_proj.weight_t.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[quantization]
    assert attn.qkv_proj.weight_scale.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == DTYPES[dtype]
    outs = greedy(engine_for(tiny_dir, model))
    assert [len(t) for t in outs] == [NEW_TOKENS] * len(PROMPTS)


# -- each tensor in its dtype --------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_every_parameter_and_buffer_is_in_the_model_dtype(tiny_dir, dtype):
    model = load_model(tiny_dir, dtype)
    # NOTE: every parameter (norm weights included) and both rotary tables are in the model
    # dtype; nothing is kept in fp32 silently.
    wrong = {n: p.dtype for n, p in [*model.named_parameters(), *model.named_buffers()] if p.dtype != dtype}
    assert wrong == {}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * 2 + 1 and all(m.weight.dtype == dtype for m in norms)
    # The tables hold what transformers applies: fp32 cos/sin rounded to the model dtype.
    ref = RotaryEmbedding(16, 512, 10000.0)
    assert torch.equal(model.rotary.cos, ref.cos.to(dtype))
    assert torch.equal(model.rotary.sin, ref.sin.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_norm_returns_the_activations_dtype(dtype):
    norm = RMSNorm(64, 1e-5, dtype)
    x, residual = torch.randn(3, 64).to(dtype), torch.randn(3, 64).to(dtype)
    out, res = norm(x, residual.clone())
    assert out.dtype == res.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_pipeline_stages_loaded_apart_give_the_whole_models_logits(tmp_path, dtype):
    # What a Ray shard loads: a slice of the layers, here of a tied model whose last stage
    # reads its LM head from the embedding's checkpoint tensor.
    model_dir = write_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    ids = list(range(20, 37))
    inputs = pack_batch([(ids, 0, list(range(5)), True)], (), 4, torch.device("cpu"))

    def run(model, hidden=None, residual=None):
        shard = ShardRunner(model, 8, 4)
        return model(inputs.input_ids, inputs.positions, shard.kv_caches, inputs.meta, shard.backend, hidden, residual)

    whole = load_model(model_dir, dtype)
    first, last = load_model(model_dir, dtype, layer_end=1), load_model(model_dir, dtype, layer_start=1)
    assert first.norm is None and last.embed_tokens is None and last.lm_head.weight.dtype == dtype
    with torch.inference_mode():
        want = whole.compute_logits(run(whole)[0])
        hidden, residual = run(first)
        assert hidden.dtype == residual.dtype == dtype
        got = last.compute_logits(run(last, hidden, residual)[0])
    assert torch.equal(got, want)


# -- the model is built on the meta device -------------------------------------------------


def test_load_model_builds_on_meta_and_materializes_on_the_device(tiny_dir, monkeypatch):
    built = []
    init = llama.LlamaForCausalLM.__init__

    def spy(self, *args, **kwargs):
        built.append(torch.get_default_device())
        init(self, *args, **kwargs)
        built.append({p.device.type for p in [*self.parameters(), *self.buffers()]})

    monkeypatch.setattr(llama.LlamaForCausalLM, "__init__", spy)
    model = load_model(tiny_dir, torch.bfloat16)
    assert built == [torch.device("meta"), {"meta"}]
    assert {p.device.type for p in [*model.parameters(), *model.buffers()]} == {"cpu"}


class _Allocations(TorchDispatchMode):
    """Bytes of every new (non-view) tensor storage an op returns off the meta device, by dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: Counter[torch.dtype] = Counter()
        self.largest: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in inputs:
                    self.bytes[t.dtype] += storage.nbytes()
                    self.largest[t.dtype] = max(self.largest.get(t.dtype, 0), storage.nbytes())
        return out


def test_a_bf16_load_allocates_the_shard_once_and_nothing_in_fp32(tmp_path):
    # A tied model whose weights dwarf the rotary tables, so a full-size fp32 build, a
    # converted copy or an untied second head would each show.
    model_dir = write_tiny_llama(tmp_path / "tied", vocab_size=2048, max_position=64, tie_word_embeddings=True)
    with _Allocations() as allocs:
        model = load_model(model_dir, torch.bfloat16)
    assert model.lm_head.weight is model.embed_tokens.weight
    shard_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert shard_bytes > 300_000
    # fp32 is only the rotary tables' computation (positions x inverse frequencies, cos, sin):
    # a few [max_position, head_dim] tensors, far below one weight matrix.
    table = 64 * 16 * 4
    assert allocs.largest.get(torch.float32, 0) <= table
    assert allocs.bytes[torch.float32] <= 8 * table
    assert allocs.bytes[torch.bfloat16] <= shard_bytes + 2 * table


# -- the Triton norm and rotary path -------------------------------------------------------


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors need the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_triton_norm_and_rotary_match_the_torch_path(tiny_dir, dtype, monkeypatch):
    model = load_model(tiny_dir, dtype)
    want = greedy(engine_for(tiny_dir, model))
    kernels = fused.triton_kernels()
    calls: Counter[str] = Counter()
    for name in ("rms_norm", "rotary_embedding"):
        launcher = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=launcher, _n=name, **k: calls.update([_n]) or _f(*a, **k))
    monkeypatch.setattr(fused, "triton_usable", lambda *tensors: True)
    for name in ("fused_add_rms_norm", "rotary_embedding"):
        monkeypatch.setattr(cpu_ops, name, lambda *a, _n=name, **k: pytest.fail(f"cpu_ops.{_n} ran on the Triton path"))
    assert greedy(engine_for(tiny_dir, model)) == want
    # Every step runs each layer's two norms, the final norm and each layer's rotary.
    assert calls["rms_norm"] > 0 and calls["rotary_embedding"] > 0
    assert calls["rms_norm"] == 5 * calls["rotary_embedding"] / 2


def test_fp32_on_cpu_runs_the_compiled_ops_and_half_precision_the_torch_twins(tiny_dir, monkeypatch):
    if not cpu_ops.available():
        pytest.skip("the compiled CPU ops are not built here")
    calls: Counter[str] = Counter()
    for name in ("fused_add_rms_norm", "rotary_embedding"):
        op = getattr(cpu_ops, name)
        monkeypatch.setattr(cpu_ops, name, lambda *a, _f=op, _n=name, **k: calls.update([_n]) or _f(*a, **k))
    model = load_model(tiny_dir, torch.float32)
    model.use_cpu_stack = False  # the layer modules' own choice (the lean loop: test_llama_cpu.py)
    greedy(engine_for(tiny_dir, model), PROMPTS[:1])
    assert calls["fused_add_rms_norm"] > 0 and calls["rotary_embedding"] > 0
    calls.clear()
    greedy(engine_for(tiny_dir, load_model(tiny_dir, torch.bfloat16)), PROMPTS[:1])
    assert calls == Counter()


# -- the offline API raises when a step fails ----------------------------------------------


def test_llm_raises_step_failed_error_when_a_step_fails(tiny_dir, monkeypatch):
    engine = engine_for(tiny_dir, load_model(tiny_dir))
    shard = engine.runner.executor.shard

    def execute(delta):
        raise RuntimeError("injected step failure")

    monkeypatch.setattr(shard, "execute", execute)
    llm = LLM(engine=engine)
    with pytest.raises(StepFailedError, match="injected step failure"):
        llm.generate(PROMPTS, GREEDY)
    with pytest.raises(StepFailedError, match="injected step failure"):
        list(llm.stream(PROMPTS[0], GREEDY, request_id="s"))
