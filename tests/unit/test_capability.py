"""Dtype options against the compute capability they need, over a table of devices."""

from __future__ import annotations

import pytest
import torch

from kvtide.kernels import capability
from kvtide.kernels.capability import DeviceInfo, check_device_support, check_dtype_support, device_info

T4, A100, L4, H100 = (7, 5), (8, 0), (8, 9), (9, 0)
GPUS = {"T4": T4, "A100": A100, "L4": L4, "H100": H100}
OK, BF16, TRITON, FP8_KV = "ok", "dtype 'bfloat16'", "attention_backend 'triton'", "kv_cache_dtype 'fp8'"

# (dtype, kv_cache_dtype, attention_backend) -> what each GPU says: OK or the options refused.
TABLE = [
    (("float16", "auto", "triton"), {"T4": [TRITON], "A100": OK, "L4": OK, "H100": OK}),
    (("float16", "auto", "torch"), {"T4": OK, "A100": OK, "L4": OK, "H100": OK}),
    (("bfloat16", "auto", "triton"), {"T4": [TRITON, BF16], "A100": OK, "L4": OK, "H100": OK}),
    (("bfloat16", "auto", "torch"), {"T4": [BF16], "A100": OK, "L4": OK, "H100": OK}),
    (("bfloat16", "int8", "triton"), {"T4": [TRITON, BF16], "A100": OK, "L4": OK, "H100": OK}),
    (("bfloat16", "fp8", "triton"), {"T4": [TRITON, BF16, FP8_KV], "A100": [FP8_KV], "L4": OK, "H100": OK}),
    (("float16", "fp8", "triton"), {"T4": [TRITON, FP8_KV], "A100": [FP8_KV], "L4": OK, "H100": OK}),
    # torch's fp8 casts run on any GPU: only Triton's fp8 needs 8.9.
    (("float16", "fp8", "torch"), {"T4": OK, "A100": OK, "L4": OK, "H100": OK}),
    (("float32", "auto", "triton"), {"T4": [TRITON], "A100": OK, "L4": OK, "H100": OK}),
]


def cases():
    for (dtype, kv, backend), by_gpu in TABLE:
        for gpu, want in by_gpu.items():
            yield pytest.param(GPUS[gpu], dtype, kv, backend, want, id=f"{gpu}-{dtype}-{kv}-{backend}")


@pytest.mark.parametrize("cc,dtype,kv,backend,want", list(cases()))
def test_dtype_options_against_the_compute_capability(cc, dtype, kv, backend, want):
    check = lambda: check_dtype_support(
        "cuda", cc, kv_cache_dtype=kv, quantization="none", dtype=dtype, attention_backend=backend)
    if want == OK:
        assert check().notes == ()
        return
    with pytest.raises(ValueError) as error:
        check()
    message = str(error.value)
    for option in (TRITON, BF16, FP8_KV):
        assert (option in message) == (option in want), message
    assert message.count("needs a GPU with compute capability") == len(want)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kv", ["auto", "int8", "fp8"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("quantization", ["none", "int8", "fp8"])
def test_a_cpu_runs_every_combination(dtype, kv, backend, quantization):
    support = check_dtype_support("cpu", None, kv_cache_dtype=kv, quantization=quantization, dtype=dtype,
                                  attention_backend=backend)
    assert support.notes == ()


def test_the_message_names_the_option_the_capability_and_the_fix():
    with pytest.raises(ValueError) as error:
        check_dtype_support("cuda", A100, kv_cache_dtype="fp8", quantization="none", dtype="bfloat16",
                            attention_backend="triton")
    assert str(error.value) == (
        "kv_cache_dtype 'fp8' needs a GPU with compute capability 8.9 or newer (Ada, Hopper, Blackwell) for "
        "Triton's fp8; this GPU is 8.0 (A100, A30). Use kv_cache_dtype='int8' instead"
    )
    with pytest.raises(ValueError, match=r"this GPU is 7\.5 \(Tesla T4\)\. Use dtype='float16' instead"):
        check_dtype_support("cuda", T4, kv_cache_dtype="auto", quantization="none", dtype=torch.bfloat16,
                            attention_backend="torch", device_name="Tesla T4")


def test_resolved_dtypes_are_accepted_as_well_as_option_names():
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8'"):
        check_dtype_support("cuda", A100, kv_cache_dtype=torch.float8_e4m3fn, quantization="none",
                            dtype=torch.float16, attention_backend="triton")
    assert check_dtype_support("cuda", A100, kv_cache_dtype=torch.int8, quantization="none",
                               dtype=torch.bfloat16, attention_backend="triton").notes == ()


@pytest.mark.parametrize("cc,dtype,note", [
    (A100, "bfloat16", "FP8 matmuls need compute capability 8.9 or newer; this GPU is 8.0 (A100, A30)"),
    (L4, "float16", "FP8 matmuls need dtype 'bfloat16', not 'float16'"),
    (H100, "bfloat16", None),
])  # fmt: skip
def test_fp8_weights_run_everywhere_and_say_when_they_are_upcast(cc, dtype, note):
    support = check_dtype_support("cuda", cc, kv_cache_dtype="auto", quantization="fp8", dtype=dtype,
                                  attention_backend="triton")
    if note is None:
        assert support.notes == ()
    else:
        (got,) = support.notes
        assert got.startswith(f"quantization 'fp8': {note}, so the fp8 weights are upcast at each use")


def test_a_cuda_device_needs_its_capability():
    with pytest.raises(ValueError, match="compute_capability is needed to check a cuda device, got None"):
        check_dtype_support("cuda", None, kv_cache_dtype="auto", quantization="none", dtype="float16",
                            attention_backend="triton")


def test_device_support_reads_the_device_from_torch(monkeypatch):
    assert device_info("cpu") == DeviceInfo("cpu", None)
    assert check_device_support("cpu", kv_cache_dtype="fp8", quantization="fp8", dtype="bfloat16",
                                attention_backend="torch").notes == ()
    # A fake A100 in place of torch.cuda's answers: the check runs on what torch reports.
    monkeypatch.setattr(capability.torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(capability.torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(capability.torch.version, "hip", None)
    assert device_info("cuda:1") == DeviceInfo("cuda", (8, 0), "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"this GPU is 8\.0 \(NVIDIA A100-SXM4-80GB\)\. Use kv_cache_dtype='int8'"):
        check_device_support("cuda:1", kv_cache_dtype="fp8", quantization="none", dtype="bfloat16",
                             attention_backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_this_gpu_runs_the_default_cuda_options():
    """bf16 with the Triton kernels and an int8 cache: what a GPU run gets by default (8.0+)."""
    info = device_info("cuda")
    assert info.compute_capability is not None and info.name
    check_device_support("cuda", kv_cache_dtype="int8", quantization="none", dtype="bfloat16",
                         attention_backend="triton")


def test_an_engine_refuses_what_its_gpu_cannot_run_before_any_weight_loads(monkeypatch, tmp_path):
    """The resolved config's check (what Engine.load and every shard call before load_model)
    sees the resolved options: a T4 refuses bf16 and Triton by name."""
    from kvtide.workers import EngineConfig, resolve
    from kvtide.workers.model_loader import read_hf_config
    from tests.tiny import write_tiny_llama

    model_dir = write_tiny_llama(tmp_path / "tiny")
    config = EngineConfig.from_kwargs(model=str(model_dir), dtype="bfloat16", attention_backend="triton", num_blocks=8)
    resolved = resolve(config, str(model_dir), read_hf_config(model_dir))
    assert resolved.check_device(torch.device("cpu")) == ()
    monkeypatch.setattr(capability, "device_info", lambda device: DeviceInfo("cuda", (7, 5), "Tesla T4"))
    with pytest.raises(ValueError, match=r"attention_backend 'triton'.*dtype 'bfloat16' needs a GPU with compute"):
        resolved.check_device(torch.device("cuda:0"))
