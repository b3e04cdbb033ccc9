"""Weight quantization (workers/quantization.py): per-channel error bounds of fp8 and int8,
quantized linear layers against fp32 within those bounds, a tiny engine decoding greedily
with quantized weights, the weight bytes it saves, and rejected values."""

from __future__ import annotations

import pytest
import torch

from kvtide.workers.config import EngineConfig, resolve
from kvtide.workers.engine import Engine
from kvtide.workers.layers.linear import ColumnParallelLinear, RowParallelLinear
from kvtide.workers.model_loader import load_model, read_hf_config
from kvtide.workers.parallel import TensorParallel
from kvtide.workers.quantization import (
    FP8_DTYPE,
    Fp8PerChannel,
    Int8WeightOnly,
    Unquantized,
    get_linear_method,
    weight_bytes,
)
from kvtide.workers.sampler import SampledToken
from kvtide.workers.sampling_params import SamplingParams

from tests.tiny import tiny_llama_config, write_tiny_llama

# NOTE: the bounds below are the formats' own rounding errors, so a wrong scale, a wrong
# channel or a transposed weight breaks them by orders of magnitude.
# int8: round to nearest, |w - q * s| <= s / 2.
# fp8 e4m3: 3 mantissa bits, |w - q * s| <= |w| / 16 for normals; subnormals (below 2^-6 * s)
# are spaced 2^-9 * s apart, so the error there is <= 2^-10 * s.
FP32_SLACK = 1e-5


def error_bound(method_name: str, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |w - dequant(quant(w))| for w [out, in], scale [out]."""
    s = scale[:, None]
    if method_name == "int8":
        return (s / 2).expand_as(w)
    return w.abs() / 16 + s * 2.0**-10


def rows_with_spread(num_rows: int, in_features: int, seed: int) -> torch.Tensor:
    """Rows whose magnitudes differ by 1000x, so one scale for all of them would not do."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.logspace(-2, 1, num_rows)[torch.randperm(num_rows, generator=g)]
    return torch.randn(num_rows, in_features, generator=g) * magnitude[:, None]


@pytest.mark.parametrize("method", [Fp8PerChannel(), Int8WeightOnly()], ids=["fp8", "int8"])
def test_quantize_rows_within_the_format_rounding_error(method):
    w = rows_with_spread(48, 80, seed=1)
    w[5] = 0.0  # an all-zero channel must not divide by zero
    q, scale = method.quantize(w)
    assert q.dtype == method.qdtype and scale.dtype == torch.float32
    assert scale[5] == 1.0 and torch.all(q[5].float() == 0)
    err = (w - q.float() * scale[:, None]).abs()
    assert torch.all(err <= error_bound(method.name, w, scale) * (1 + FP32_SLACK))
    # Each channel's largest value lands on the format's largest magnitude.
    nonzero = torch.arange(48) != 5
    assert torch.allclose(q.float().abs().amax(dim=1)[nonzero], torch.tensor(float(method.qmax)))


def _linear_pair(method, seed: int = 0):
    """A merged column-parallel (q/k/v-like sizes) and a row-parallel layer, loaded from the
    same fp32 weights as fp32 and as ``method``."""
    in_features, sizes = 64, [48, 16, 16]
    full = [rows_with_spread(n, in_features, seed + i) for i, n in enumerate(sizes)]
    row_w = rows_with_spread(32, 80, seed + 7)
    layers = []
    for m in (Unquantized(), method):
        col = ColumnParallelLinear(in_features, sizes)
        col.set_method(m)
        for shard, w in enumerate(full):
            col.load(shard, w)
        row = RowParallelLinear(80, 32)
        row.set_method(m)
        row.load(0, row_w)
        layers.append((col, row))
    return layers, torch.cat(full), row_w


@pytest.mark.parametrize(
    "method",
    [Fp8PerChannel(), Int8WeightOnly(int8pack_mm=True), Int8WeightOnly(int8pack_mm=False)],
    ids=["fp8-upcast", "int8-int8pack_mm", "int8-upcast"],
)
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
def test_quantized_linear_matches_fp32_within_the_weight_error(method, num_tokens):
    (ref_col, ref_row), (q_col, q_row) = _linear_pair(method)[0]
    for ref, quant in ((ref_col, q_col), (ref_row, q_row)):
        assert quant.weight_t.dtype == method.qdtype
        assert quant.weight_t.shape == ref.weight_t.shape
        x = torch.randn(num_tokens, ref.weight_t.shape[0])
        w = ref.weight_t.t()
        # |x @ (W - W_q)^T| <= |x| @ bound^T, elementwise.
        bound = x.abs() @ error_bound(method.name, w, quant.weight_scale).t()
        y_ref, y = ref(x), quant(x)
        assert y.shape == y_ref.shape
        assert torch.all((y - y_ref).abs() <= bound * (1 + 1e-3) + FP32_SLACK * y_ref.abs().amax())


def test_int8pack_mm_and_upcast_agree():
    pack = _linear_pair(Int8WeightOnly(int8pack_mm=True))[0][1][0]
    upcast = _linear_pair(Int8WeightOnly(int8pack_mm=False))[0][1][0]
    assert torch.equal(pack.weight_t, upcast.weight_t)
    assert pack.weight_t.t().is_contiguous()  # the [out, in] layout the op requires
    x = torch.randn(7, 64)
    torch.testing.assert_close(pack(x), upcast(x), rtol=1e-5, atol=1e-5)


def test_tensor_parallel_rank_quantizes_only_its_slice():
    full = rows_with_spread(32, 16, seed=3)
    tp = TensorParallel(rank=1, size=2, group=object())  # load() never communicates
    layer = ColumnParallelLinear(16, [32], tp=tp)
    layer.set_method(Int8WeightOnly())
    layer.load(0, full)
    q, scale = Int8WeightOnly().quantize(full[16:])
    assert torch.equal(layer.weight_t.t(), q)
    assert torch.equal(layer.weight_scale, scale)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return str(write_tiny_llama(tmp_path_factory.mktemp("quant") / "tiny"))


def _engine(model_dir: str, quantization: str) -> Engine:
    config = EngineConfig.from_kwargs(
        model=model_dir, quantization=quantization, num_blocks=64, block_size=4, max_num_seqs=4
    )
    resolved = resolve(config, model_dir, read_hf_config(model_dir))
    return Engine.from_model(load_model(model_dir, quantization=quantization), resolved)


def _greedy(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[SampledToken]]:
    """Greedy, all prompts in one batch; the sampled tokens with their top-5 logprobs."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, logprobs=5)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    out: dict[str, list[SampledToken]] = {}
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        for d in engine.step():
            out.setdefault(d.request_id, []).extend(d.logprobs)
    return [out[f"r{i}"] for i in range(len(prompts))]


PROMPTS = [[5, 17, 33, 41, 60], [7, 7, 8, 90, 12, 13, 40, 41, 3]]
# Largest |logprob difference| vs fp32 over the first token's top 5, about twice the largest
# measured on this model and these prompts (fp8 0.13, int8 0.044 nats).
FIRST_TOKEN_LOGPROB_TOL = {"fp8": 0.25, "int8": 0.1}


@pytest.mark.parametrize("quantization", ["fp8", "int8"])
def test_tiny_engine_decodes_greedily_with_quantized_weights(tiny_dir, quantization):
    engine = _engine(tiny_dir, quantization)
    layer = engine.runner.executor.model.layers[0]
    assert layer.mlp.down_proj.weight_t.dtype == {"fp8": FP8_DTYPE, "int8": torch.int8}[quantization]
    batched = _greedy(engine, PROMPTS, new_tokens=10)
    assert [len(t) for t in batched] == [10, 10]
    # Batching invariance through the quantized layers: each prompt alone decodes the same.
    for prompt, together in zip(PROMPTS, batched, strict=True):
        alone = _greedy(_engine(tiny_dir, quantization), [prompt], new_tokens=10)[0]
        assert [t.token_id for t in alone] == [t.token_id for t in together]
    # The first token sees the same context in both models: its top-5 logprobs stay close to
    # fp32's (a wrong scale, channel or layout moves them by whole nats). Later tokens may
    # diverge where the random model's top two logits are nearly tied.
    reference = _greedy(_engine(tiny_dir, "none"), PROMPTS, new_tokens=1)
    for ref, got in zip(reference, batched, strict=True):
        assert got[0].token_id == ref[0].token_id
        ref_top, got_top = dict(ref[0].top_logprobs), dict(got[0].top_logprobs)
        diff = max(abs(got_top.get(t, float("-inf")) - lp) for t, lp in ref_top.items())
        assert diff <= FIRST_TOKEN_LOGPROB_TOL[quantization]


@pytest.mark.parametrize("quantization", ["fp8", "int8"])
def test_quantized_weight_bytes(tiny_dir, quantization):
    c = tiny_llama_config()
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    nh, nkv, v = c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]
    linear_out_in = [((nh + 2 * nkv) * d, h), (h, nh * d), (2 * i, h), (h, i)]
    per_layer_linear = sum(o * n for o, n in linear_out_in)
    per_layer_scales = sum(o for o, _ in linear_out_in)
    per_layer_norms = 2 * h
    other = 2 * v * h + h  # embedding, untied LM head, final norm: all fp32
    num_layers = c["num_hidden_layers"]
    fp32_bytes = 4 * (num_layers * (per_layer_linear + per_layer_norms) + other)
    quant_bytes = num_layers * (per_layer_linear + 4 * per_layer_scales + 4 * per_layer_norms) + 4 * other
    assert weight_bytes(load_model(tiny_dir)) == fp32_bytes
    assert weight_bytes(load_model(tiny_dir, quantization=quantization)) == quant_bytes


@pytest.mark.parametrize("bad", ["int4", "FP8", "", "awq"])
def test_bad_quantization_is_rejected(tiny_dir, bad):
    config = EngineConfig.from_kwargs(model=tiny_dir, quantization=bad, num_blocks=8)
    with pytest.raises(ValueError, match=rf"quantization must be one of none, fp8, int8; got '{bad}'"):
        resolve(config, tiny_dir, read_hf_config(tiny_dir))
    with pytest.raises(ValueError, match="quantization must be one of none, fp8, int8"):
        get_linear_method(bad)


@pytest.mark.gpu
def test_fp8_scaled_mm_matches_bf16_on_fp8_gpus():
    device = torch.device("cuda")
    if torch.cuda.get_device_capability(device) < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability >= 8.9")
    method = get_linear_method("fp8", device)
    assert method.scaled_mm
    w = rows_with_spread(256, 128, seed=5)
    layer = ColumnParallelLinear(128, [256], dtype=torch.bfloat16)
    layer.set_method(method)
    layer.load(0, w)
    layer.to(device)
    assert layer.weight_t.t().is_contiguous()  # _scaled_mm's column-major operand
    x = torch.randn(9, 128, device=device, dtype=torch.bfloat16)
    y = layer(x).float()
    y_ref = x.float() @ w.to(device).t()
    # Weights and activations both rounded to e4m3 (2^-4 relative each), output in bf16.
    bound = (x.float().abs() @ w.abs().to(device).t()) * (2 * 2.0**-4 + 2.0**-8) + 1e-3
    assert torch.all((y - y_ref).abs() <= bound)
    # The fallback rounds only the weights, so the two differ by the activations' rounding: a
    # bound on sum |x| |w|, not on |y| (an H200 run saw -0.93 against -2.31 where terms cancel).
    y_deq = method.dequantize_apply(layer, x).float()
    assert torch.all((y - y_deq).abs() <= bound)
